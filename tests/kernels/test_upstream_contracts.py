"""Contract tests: sambay's CUDA adapters called the way the model calls them, through the real upstream
packages (mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0, flash-attn 2.8.3.post2, installed Python-only), on CPU.

Upstream's Python wrappers, autograd functions and custom ops run for real; its Triton
``selective_state_update`` runs under Triton's interpreter; the compiled extensions are the strict stand-ins
of :mod:`upstream_fakes`, which enforce the C++ checks (dtypes, shapes, unit strides, 16-byte alignment where
the kernels vectorize) before computing in fp32. The CUDA adapters are forced for CPU tensors through the
dispatcher's one device hook (the ``force_cuda`` fixture). Every result is compared with the twins.

Skipped, with the reason, only when the upstream packages are not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import pytest
import torch
import upstream_fakes
from helpers import fixture_model, random_mamba, rel_err

from sambay.cache import MambaState

pytestmark = pytest.mark.skipif(bool(upstream_fakes.missing()),
                                reason=f"upstream packages not installed: {upstream_fakes.missing()} "
                                       "(install them Python-only as .ci/run does)")


@pytest.fixture(scope="module")
def upstream():
    """The upstream packages importable on CPU, their compiled extensions replaced by the stand-ins."""
    if "TRITON_INTERPRET" not in __import__("os").environ:
        pytest.skip("upstream's Triton selective_state_update needs TRITON_INTERPRET=1 on CPU")
    upstream_fakes.install()
    from sambay.kernels import dispatch

    dispatch.clear_probes()
    yield
    dispatch.clear_probes()


@pytest.fixture
def force_cuda(upstream, monkeypatch):
    """Make the dispatcher treat CPU tensors as CUDA tensors: its single device hook."""
    from sambay.kernels import dispatch

    monkeypatch.setattr(dispatch, "on_cuda", lambda *tensors: True)
    upstream_fakes.cpu_device_context(monkeypatch)
    upstream_fakes.count_state_update(monkeypatch)
    upstream_fakes.CALLS.clear()
    for family in dispatch.FAST_PATHS:  # the real upstream packages (and triton) import
        assert dispatch.probe(family) is None, dispatch.probe(family)


def _mamba(dtype, memory_producer=False, seed=0, C=32, E=64):
    return random_mamba(C, E, 8, 4, memory_producer, seed, dtype, conv_bias_std=0.1)


def _state(m, B, dtype):
    return MambaState(torch.zeros(B, m.d_inner, m.d_conv - 1, dtype=dtype), torch.zeros(B, m.d_inner, m.d_state))


def _run(m, backend, x, steps=0):
    """forward over x, then ``steps`` decode steps continuing it; returns (outs, memories, state)."""
    m.backend = backend
    B, T, _ = x.shape
    state = _state(m, B, x.dtype)
    with torch.no_grad():
        out, mem = m(x[:, :T - steps], state=state, fresh=True)
        outs, mems = [out], [mem]
        for t in range(T - steps, T):
            o, mm = m.step(x[:, t:t + 1], state)
            outs.append(o)
            mems.append(mm)
    cat = lambda ts: None if ts[0] is None else torch.cat(ts, 1)
    return cat(outs), cat(mems), state


# T = 128 and 256 are whole multiples of the scan's block chunk (kIsEvenLen: 16-byte loads); 5 and 131 are not.
@pytest.mark.parametrize("T", [5, 128, 131, 256])
@pytest.mark.parametrize("memory_producer", [False, True], ids=["gated", "memory"])
def test_mamba_forward_fp32_through_upstream(force_cuda, T, memory_producer):
    m = _mamba(torch.float32, memory_producer)
    x = torch.randn(2, T, 32)
    fast, fast_mem, fast_state = _run(m, "cuda", x)
    twin, twin_mem, twin_state = _run(m, "torch", x)
    assert upstream_fakes.CALLS["selective_scan_fwd"] == 1 and upstream_fakes.CALLS["causal_conv1d_fwd"] == 1
    assert rel_err(fast, twin) <= 1e-5
    assert rel_err(fast_state.ssm, twin_state.ssm) <= 1e-5
    assert torch.equal(fast_state.conv, twin_state.conv)
    if memory_producer:
        assert rel_err(fast_mem, twin_mem) <= 1e-5


@pytest.mark.parametrize("T", [5, 128])
def test_mamba_forward_bf16_through_upstream(force_cuda, T):
    """bf16: the upstream kernel needs delta in the input dtype; judged against the fp32 twin."""
    m = _mamba(torch.float32, memory_producer=True)
    x = torch.randn(2, T, 32)
    ref, ref_mem, _ = _run(m, "torch", x)
    m16 = m.to(torch.bfloat16)
    fast, fast_mem, _ = _run(m16, "cuda", x.bfloat16())
    twin, twin_mem, _ = _run(m16, "torch", x.bfloat16())
    assert upstream_fakes.CALLS["selective_scan_fwd"] == 1
    assert rel_err(fast, ref) <= 2 * rel_err(twin, ref) + 1e-3
    assert rel_err(fast_mem, ref_mem) <= 2 * rel_err(twin_mem, ref_mem) + 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_producer", [False, True], ids=["gated", "memory"])
def test_mamba_decode_steps_through_upstream(force_cuda, dtype, memory_producer):
    """Prefill 5 tokens, then 4 decode steps: causal_conv1d_update and upstream's Triton selective_state_update."""
    m = _mamba(dtype, memory_producer, seed=1)
    x = torch.randn(3, 9, 32, dtype=dtype)
    fast, fast_mem, fast_state = _run(m, "cuda", x, steps=4)
    twin, twin_mem, twin_state = _run(m, "torch", x, steps=4)
    assert upstream_fakes.CALLS["selective_state_update"] == 4 and upstream_fakes.CALLS["causal_conv1d_update"] == 4
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(fast, twin) <= tol
    assert rel_err(fast_state.ssm, twin_state.ssm) <= tol
    assert torch.equal(fast_state.conv, twin_state.conv)
    if memory_producer:
        assert rel_err(fast_mem, twin_mem) <= tol


@pytest.mark.slow
@pytest.mark.parametrize("T", [5, 128])
def test_tiny_model_forward_and_decode_through_upstream(force_cuda, T):
    """The whole tiny8 model, fp32, CUDA adapters forced (Mamba scan/conv, Triton gating), then 3 decode steps,
    against the same model on the twins."""
    model = fixture_model("tiny8").eval()
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, model.config.vocab_size, (2, T + 3), generator=g)

    def run():
        cache = model.allocate_cache(2, T + 3)
        with torch.no_grad():
            logits = [model(ids[:, :T], cache=cache).logits]
            for t in range(T, T + 3):
                logits.append(model(ids[:, t:t + 1], cache=cache).logits)
        return torch.cat(logits, 1)

    model.set_backend("auto")
    fast = run()
    layers = model.config.num_hidden_layers
    calls = dict(upstream_fakes.CALLS)
    model.set_backend("torch")
    twin = run()
    assert rel_err(fast, twin) <= 1e-4
    # tiny8: 8 layers, Mamba at layers 0, 2 and the memory layer 4; fp32 attention is never flash-attn's
    assert calls["selective_scan_fwd"] == calls["causal_conv1d_fwd"] == 3, (calls, layers)
    assert calls["selective_state_update"] == calls["causal_conv1d_update"] == 3 * 3, calls
    assert upstream_fakes.CALLS == calls  # the twins' run reached no upstream code


@pytest.mark.slow
def test_tiny_model_bf16_through_upstream(force_cuda, monkeypatch):
    """bf16, T = 128: flash-attn (causal and sliding window) as well; judged against the fp32 model. The Triton
    gating kernels keep to the twin here: Triton's CPU interpreter computes bf16 tl.dot wrongly (test_gmu.py)."""
    from sambay.kernels import dispatch

    monkeypatch.setitem(dispatch._PROBES, "gating", "bf16 tl.dot is wrong under Triton's interpreter")
    ref_model = fixture_model("tiny8").eval()
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_model.set_backend("torch")
        ref = ref_model(ids).logits
        model = fixture_model("tiny8", dtype=torch.bfloat16).eval()
        fast = model(ids).logits
        calls = dict(upstream_fakes.CALLS)
        model.set_backend("torch")
        twin = model(ids).logits
    assert calls["selective_scan_fwd"] == 3 and calls["flash_fwd"] > 0, calls
    assert rel_err(fast, ref) <= 2 * rel_err(twin, ref) + 1e-2


def _attn_inputs(dtype, tq, tk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 8, tq, 16, generator=g)
    k = torch.randn(2, 4, tk, 16, generator=g)
    v = torch.randn(2, 4, tk, 32, generator=g)
    return q, k, v


@pytest.mark.parametrize("tq, tk, flash", [(12, 12, (True, None)), (12, 12, (True, 5)), (1, 20, (False, None)),
                                           (1, 20, (True, 7)), (4, 20, (True, None))])
def test_flash_attention_through_upstream(force_cuda, tq, tk, flash):
    """bf16 flash_attn_func (two D-wide value halves) against the fp32 masked twin."""
    from sambay import kernels
    from sambay.kernels.attention import twin as twins

    q, k, v = _attn_inputs(torch.float32, tq, tk)
    i = torch.arange(tk - tq, tk)[:, None]
    j = torch.arange(tk)[None]
    vis = (j <= i) if flash[0] else torch.ones(tq, tk, dtype=torch.bool)
    if flash[1] is not None:
        vis = vis & (j > i - flash[1])
    mask = vis[None, None].expand(2, 1, -1, -1)
    ref = twins.attend(q, k, v, mask, False, 0.25)
    bf = [t.bfloat16() for t in (q, k, v)]
    twin = twins.attend(*bf, mask, False, 0.25)
    fast = kernels.attend(*bf, None, False, 0.25, flash=flash, backend="cuda")
    assert upstream_fakes.CALLS["flash_fwd"] == 2  # the 2D-wide value as two D-wide calls
    assert fast.shape == ref.shape and fast.dtype == torch.bfloat16
    assert rel_err(fast, ref) <= 2 * rel_err(twin, ref) + 1e-3
