"""The CUDA fast paths (mamba_ssm, causal_conv1d, flash_attn) against their PyTorch twins.

On CPU only the dispatch rules are checked; the numerical comparisons are marked ``cuda`` and run on
any CUDA machine with the ``cuda`` extra installed (bf16, realistic shapes, judged against fp32)."""

import pytest
import torch
from helpers import rel_err

from sambay import kernels
from sambay.kernels import dispatch
from sambay.kernels.attention import cuda as attention_cuda
from sambay.kernels.attention import twin as twins
from sambay.kernels.conv import cuda as conv_cuda
from sambay.kernels.conv.twin import causal_conv1d as causal_conv1d_ref
from sambay.kernels.conv.twin import causal_conv1d_step as causal_conv1d_step_ref
from sambay.kernels.scan import cuda as scan_cuda
from sambay.kernels.scan.twin import selective_scan as selective_scan_ref
from sambay.kernels.scan.twin import selective_step as selective_step_ref

# The public ops under their former module names (the tests' assertions are unchanged).
mamba_ops = attention_ops = kernels
attention_ops_attend_ref = twins.attend


def _scan_inputs(B, T, E, N, device="cpu", dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)
    x = r(B, T, E).to(dtype)
    delta = (r(B, T, E) - 2).to(dtype)  # the raw time step dt: the ops apply softplus(dt + dt_bias)
    A = -torch.exp(r(E, N) * 0.5)
    return x, delta, A, r(B, T, N).to(dtype), r(B, T, N).to(dtype), r(E), r(B, T, E).to(dtype)


def test_auto_takes_the_twins_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a CUDA kernel was called for CPU tensors")

    for module, names in ((attention_cuda, ("attend_flash",)), (conv_cuda, ("causal_conv1d", "causal_conv1d_step")),
                          (scan_cuda, ("selective_scan", "selective_step"))):
        for name in names:
            monkeypatch.setattr(module, name, boom)
    monkeypatch.setattr(dispatch, "probe", lambda family: None)  # even if the packages were there
    x, delta, A, Bm, Cm, D, z = _scan_inputs(2, 5, 6, 3)
    out, last = mamba_ops.selective_scan(x, delta, A, Bm, Cm, D, z=z)
    ref, ref_last = selective_scan_ref(x, delta, A, Bm, Cm, D, z=z)
    assert torch.equal(out, ref) and torch.equal(last, ref_last)
    h = torch.randn(2, 6, 8)
    w, b = torch.randn(6, 4), torch.randn(6)
    assert torch.equal(mamba_ops.causal_conv1d(h, w, b), causal_conv1d_ref(h, w, b))
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 16)
    assert torch.equal(attention_ops.attend(q, k, v, None, True, 0.3, flash=(True, None)),
                       attention_ops_attend_ref(q, k, v, None, True, 0.3))


def test_asking_for_cuda_on_cpu_says_why():
    x, delta, A, Bm, Cm, D, _ = _scan_inputs(1, 3, 4, 2)
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        mamba_ops.selective_scan(x, delta, A, Bm, Cm, D, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        q = torch.randn(1, 2, 3, 8)
        attention_ops.attend(q, q, q, None, True, 0.3, flash=(True, None), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        mamba_ops.causal_conv1d(torch.randn(1, 2, 5), torch.randn(2, 4), None, backend="triton")
    assert callable(dispatch.on_cuda)  # the device hook the CPU contract tests patch (test_upstream_contracts.py)


def test_model_backend_torch_reaches_every_layer():
    from helpers import random_model

    model = random_model()
    model.set_backend("torch")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"torch"}
    with pytest.raises(ValueError, match="expected 'auto' or 'torch'"):
        model.set_backend("fast")


cuda = pytest.mark.cuda


@cuda
def test_selective_scan_cuda_matches_twin():
    pytest.importorskip("mamba_ssm")
    args = _scan_inputs(2, 1024, 5120 // 4, 16, device="cuda", dtype=torch.bfloat16)
    x, delta, A, Bm, Cm, D, z = args
    ref32, last32 = selective_scan_ref(x.float(), delta, A, Bm.float(), Cm.float(), D, z=z.float())
    ref16, _ = selective_scan_ref(x, delta, A, Bm, Cm, D, z=z)
    out, last = mamba_ops.selective_scan(x, delta, A, Bm, Cm, D, z=z, backend="cuda")
    assert rel_err(out, ref32) <= 2 * rel_err(ref16, ref32) + 1e-3
    assert rel_err(last, last32) <= 1e-3


@cuda
def test_selective_step_cuda_matches_twin():
    pytest.importorskip("mamba_ssm")
    x, delta, A, Bm, Cm, D, z = _scan_inputs(4, 1, 2048, 16, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(4, 2048, 16, device="cuda")
    s_ref = state.clone()
    ref = selective_step_ref(s_ref, x[:, 0], delta[:, 0], A, Bm[:, 0], Cm[:, 0], D, z=z[:, 0])
    out = mamba_ops.selective_step(state, x[:, 0], delta[:, 0], A, Bm[:, 0], Cm[:, 0], D, z=z[:, 0], backend="cuda")
    assert rel_err(out, ref) <= 1e-2 and rel_err(state, s_ref) <= 1e-5


@cuda
def test_causal_conv1d_cuda_matches_twin():
    pytest.importorskip("causal_conv1d")
    h = torch.randn(2, 2048, 3 + 512, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(2048, 4, device="cuda", dtype=torch.bfloat16), torch.randn(2048, device="cuda")
    b = b.to(torch.bfloat16)
    assert rel_err(mamba_ops.causal_conv1d(h, w, b, backend="cuda"), causal_conv1d_ref(h, w, b)) <= 1e-2
    state, x = torch.randn(2, 2048, 3, device="cuda", dtype=torch.bfloat16), h[:, :, 0]
    s_ref = state.clone()
    ref = causal_conv1d_step_ref(s_ref, x, w, b)
    assert rel_err(mamba_ops.causal_conv1d_step(state, x, w, b, backend="cuda"), ref) <= 1e-2
    assert torch.equal(state, s_ref)


@cuda
@pytest.mark.parametrize("tq, tk, flash", [(512, 512, (True, None)), (512, 512, (True, 128)), (1, 4096, (False, None)),
                                           (64, 1024, (True, None))])
def test_flash_attention_matches_twin(tq, tk, flash):
    pytest.importorskip("flash_attn")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 20, tq, 64, device="cuda", generator=g)
    k = torch.randn(2, 10, tk, 64, device="cuda", generator=g)
    v = torch.randn(2, 10, tk, 128, device="cuda", generator=g)
    i = torch.arange(tk - tq, tk, device="cuda")[:, None]
    j = torch.arange(tk, device="cuda")[None]
    vis = (j <= i) if flash[0] else torch.ones(tq, tk, dtype=torch.bool, device="cuda")
    if flash[1] is not None:
        vis = vis & (j > i - flash[1])
    mask = vis[None, None].expand(2, 1, -1, -1)
    ref32 = attention_ops_attend_ref(q, k, v, mask, False, 0.125)
    bf = [t.bfloat16() for t in (q, k, v)]
    ref16 = attention_ops_attend_ref(*bf, mask, False, 0.125)
    out = attention_ops.attend(*bf, None, False, 0.125, flash=flash, backend="cuda")
    assert rel_err(out, ref32) <= 2 * rel_err(ref16, ref32) + 1e-3


@cuda
def test_model_on_cuda_matches_cpu_twins():
    from helpers import fixture_model, load_fixture

    _, inp, exp, _ = load_fixture("small16")
    model = fixture_model("small16", dtype=torch.bfloat16).cuda()
    ids, mask = inp["input_ids"].cuda(), inp["attention_mask"].cuda()
    with torch.no_grad():
        fast = model(ids).logits.float().cpu()  # no padding mask: the flash paths apply
        model.set_backend("torch")
        twin = model(ids).logits.float().cpu()
    ref = fixture_model("small16")(inp["input_ids"]).logits.detach()
    assert rel_err(fast, ref) <= 2 * rel_err(twin, ref) + 1e-2
    del mask, exp


@pytest.mark.parametrize("tq, tk, masked, causal, dtype", [
    pytest.param(1, 37, False, False, torch.float32, id="decode"),
    pytest.param(3, 20, True, False, torch.float32, id="masked-chunk"),
    pytest.param(6, 6, False, True, torch.float64, id="causal"),
    pytest.param(1, 50, True, False, torch.bfloat16, id="bf16-decode"),
])
def test_matmul_attention_for_few_rows_equals_sdpa(tq, tk, masked, causal, dtype):
    """The CPU decode path (two matmuls) against SDPA itself, in a dtype above the one compared."""
    g = torch.Generator().manual_seed(tq * tk)
    q, k, v = torch.randn(2, 6, tq, 8, generator=g), torch.randn(2, 3, tk, 8, generator=g), torch.randn(2, 3, tk, 16,
                                                                                                        generator=g)
    mask = torch.rand(2, 1, tq, tk, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                           attn_mask=mask, is_causal=causal, scale=0.3,
                                                           enable_gqa=True)
    out = twins._attend_matmul(q.to(dtype), k.to(dtype), v.to(dtype), mask, causal, 0.3)
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert rel_err(out.double(), ref) <= tol
    assert twins._MATMUL_ROWS >= 1  # decode (tq=1) always takes this path on the CPU


@pytest.mark.parametrize("tq, masked", [(1, False), (4, True)])
def test_attend_pair_reads_v_once_and_equals_two_calls(tq, masked):
    g = torch.Generator().manual_seed(7)
    q1, q2 = torch.randn(2, 4, tq, 8, generator=g), torch.randn(2, 4, tq, 8, generator=g)
    k, v = torch.randn(2, 2, 2, 30, 8, generator=g), torch.randn(2, 2, 30, 16, generator=g)
    mask = (torch.rand(2, 1, tq, 30, generator=g) > 0.3) | (torch.arange(30) == 0) if masked else None
    o1, o2 = attention_ops.attend_pair(q1, q2, k, v, mask, False, 0.35)
    r1 = torch.nn.functional.scaled_dot_product_attention(q1, k[:, 0], v, attn_mask=mask, scale=0.35, enable_gqa=True)
    r2 = torch.nn.functional.scaled_dot_product_attention(q2, k[:, 1], v, attn_mask=mask, scale=0.35, enable_gqa=True)
    assert rel_err(o1, r1) <= 1e-6 and rel_err(o2, r2) <= 1e-6
