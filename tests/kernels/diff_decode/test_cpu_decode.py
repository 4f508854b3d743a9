"""sambay's CPU decode-attention kernel (diff_decode/cpu_diff_decode.cpp via diff_decode_cpu) against the spec
(diff_decode_ref, in fp64), and the property they exist for: a bf16 decode step reads the K/V cache in place,
with no conversion or copy of it."""

from __future__ import annotations

import pytest
import torch

from sambay.kernels import active_backends, diff_attend
from sambay.kernels import diff_decode as dd
from sambay.kernels.diff_decode.ref import diff_decode_ref

KERNELS = active_backends("cpu")["diff_decode"] == "sambay_cpu"
pytestmark = pytest.mark.skipif(not KERNELS, reason="sambay's CPU kernels cannot be built or run on this machine")
AVAILABLE = [name.split("+")[0] for name in torch.ops.sambay_cpu.isas()] if KERNELS else []
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in AVAILABLE, reason=f"this CPU has no {isa}"))
        for isa in ("avx2", "avx512")]


def diff_decode_cpu(q1, q2, k, v, valid, lam, scale, isa="auto"):
    """The kernel (signature (q, k, v, valid, lam, scale)) on the two maps' queries as the model holds them."""
    B, H2, _, D = q1.shape
    q = torch.stack([q1[:, :, 0], q2[:, :, 0]], dim=2).view(B, 2 * H2, D)  # checkpoint order 2j, 2j+1
    return dd.diff_decode_cpu(q, k, v, valid, lam, scale, isa=isa)[:, :, None]


def _case(B, G, R, S, D, dtype, seed=0, spare=3):
    """Queries, and K/V as views of a longer cache (as the model passes them: strided, unit last stride)."""
    g = torch.Generator().manual_seed(seed)
    q1, q2 = (torch.randn(B, G * R, 1, D, generator=g).to(dtype) for _ in range(2))
    k = torch.randn(B, 2, G, S + spare, D, generator=g).to(dtype)[..., :S, :]
    v = torch.randn(B, G, S + spare, 2 * D, generator=g).to(dtype)[..., :S, :]
    return q1, q2, k, v


def _ref(q1, q2, k, v, valid, lam, scale):
    B, H2, _, D = q1.shape
    q = torch.stack([q1[:, :, 0], q2[:, :, 0]], dim=2).view(B, 2 * H2, D)  # checkpoint order 2j, 2j+1
    valid = torch.ones(B, k.shape[3], dtype=torch.bool) if valid is None else valid
    return diff_decode_ref(q.double(), k.double(), v.double(), valid, lam.double(), scale)[:, :, None]


@pytest.mark.parametrize("B,G,R,S,D", [
    (1, 10, 2, 1000, 64),   # the released head layout
    (2, 3, 1, 37, 16),      # S not a multiple of 4, D a multiple of 16
    (1, 2, 3, 5000, 8),     # D < 16 (scalar dims only), S split over tasks
    (3, 1, 4, 9, 24),       # D with a tail past the vector part, several sequences
    (1, 1, 1, 1, 64),       # one slot
    (1, 2, 3, 70, 80),      # E = 160: a second, masked block of 128 output columns; rows in a pair and one alone
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_equals_spec(B, G, R, S, D, dtype, isa):
    q1, q2, k, v = _case(B, G, R, S, D, dtype)
    lam = torch.tensor(0.37).to(dtype)
    valid = torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.3
    valid[:, 0] = True
    for vis in (None, valid):
        out = diff_decode_cpu(q1, q2, k, v, vis, lam, D ** -0.5, isa)
        ref = _ref(q1, q2, k, v, vis, lam, D ** -0.5)
        assert out.dtype == dtype and out.shape == ref.shape
        # fp32: the order of the fp32 sums only; bf16/fp16: one rounding of the result (2^-9 / 2^-12) plus that
        bound = {torch.float32: 2e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= bound, f"relative error {err:.3g} > {bound:.1g}"


def test_no_visible_slot_gives_zeros():
    q1, q2, k, v = _case(2, 2, 2, 50, 16, torch.float32)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1] = False
    out = diff_decode_cpu(q1, q2, k, v, valid, torch.tensor(0.2), 0.25)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    torch.testing.assert_close(out[:1].double(), _ref(q1, q2, k, v, valid, torch.tensor(0.2), 0.25)[:1],
                               rtol=1e-5, atol=1e-6)


def test_diff_decode_auto_takes_the_kernel_on_cpu(monkeypatch):
    """The op itself, one dispatch: "auto" on CPU tensors runs the C++ kernel, "torch" the twin."""
    calls = []
    real = dd.diff_decode_cpu
    monkeypatch.setattr(dd, "diff_decode_cpu", lambda *a: calls.append(1) or real(*a))
    q1, q2, k, v = _case(1, 2, 2, 30, 16, torch.float32)
    q = torch.stack([q1[:, :, 0], q2[:, :, 0]], dim=2).view(1, 8, 16)
    valid = torch.ones(1, 30, dtype=torch.bool)
    fast = dd.diff_decode(q, k, v, valid, 0.3, 0.25)
    assert calls == [1]
    torch.testing.assert_close(fast, dd.diff_decode(q, k, v, valid, 0.3, 0.25, backend="torch"), rtol=1e-5, atol=1e-6)
    assert calls == [1]


def test_diff_attend_takes_the_kernel_for_decode_rows(monkeypatch):
    """Decode rows on CPU take the kernels under "auto" (and equal the twin); "torch" and gradients take the twin."""
    calls = []
    real = dd.diff_decode_cpu
    monkeypatch.setattr(dd, "diff_decode_cpu", lambda *a: calls.append(1) or real(*a))
    q1, q2, k, v = _case(1, 2, 2, 30, 16, torch.float32)
    lam, mask = torch.tensor(0.3), torch.ones(1, 1, 1, 30, dtype=torch.bool)
    fast = diff_attend(q1, q2, k, v, mask, False, 0.25, lam)
    assert calls == [1]
    twin = diff_attend(q1, q2, k, v, mask, False, 0.25, lam, backend="torch")
    assert calls == [1]
    torch.testing.assert_close(fast, twin, rtol=1e-5, atol=1e-6)
    diff_attend(q1.requires_grad_(), q2, k, v, mask, False, 0.25, lam).sum().backward()
    assert calls == [1] and q1.grad is not None
    lam_p = torch.tensor(0.3, requires_grad=True)  # a trainable lambda needs its gradient too: the twin runs
    diff_attend(q1.detach(), q2, k, v, mask, False, 0.25, lam_p).sum().backward()
    assert calls == [1] and lam_p.grad is not None


# The ops that would convert or copy a tensor: none of them may touch a K/V-sized tensor in a decode step.
_COPIES = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat",
           "aten::index_select", "aten::pad", "aten::constant_pad_nd"}


def test_bf16_decode_step_reads_the_cache_in_place():
    """A bf16 decode step at a context longer than any window: no op converts or copies a tensor with the
    context's length (the shared K/V read by the full and cross-attention layers)."""
    from helpers import random_model

    model = random_model(dtype=torch.bfloat16, sliding_window=7)
    context = 389
    cache = model.allocate_cache(1, context + 4)
    for layer in cache.layers:
        for t in vars(layer).values() if layer is not None else ():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.normal_()
    cache.seek(context)
    token = torch.tensor([[3]])
    with torch.inference_mode():
        model(token, cache=cache)  # warm-up (builds nothing new; the kernels are loaded by the skipif above)
        read = cache.length + 1  # the shared K/V columns this step attends: a length no other tensor has
        with torch.profiler.profile(record_shapes=True) as prof:
            model(token, cache=cache)
    offending = [(e.name, e.input_shapes) for e in prof.events() if e.name in _COPIES
                 and any(isinstance(s, list) and read in s[-2:] for s in e.input_shapes)]
    assert not offending, f"K/V-sized copies in a bf16 decode step: {offending[:5]}"
    called = {e.name for e in prof.events()}
    assert "sambay_cpu::diff_decode" in called


def test_a_failed_build_warns_once_and_the_twins_run(monkeypatch):
    """No compiler (or any build error): one RuntimeWarning naming the error, "torch" reported, same results."""
    import torch.nn.functional as F

    from sambay.kernels import cpu_native, dispatch
    from sambay.kernels.linear import linear

    monkeypatch.setattr(dispatch, "_PROBES", {})

    def no_compiler():
        raise OSError("c++: command not found")

    monkeypatch.setattr(cpu_native, "_load", no_compiler)
    with pytest.warns(RuntimeWarning, match="CPU kernels failed to build.*c\\+\\+: command not found"):
        assert active_backends("cpu")["linear"] == active_backends("cpu")["diff_decode"] == "torch"
    x, w = torch.randn(1, 24).bfloat16(), torch.randn(5, 24).bfloat16()
    torch.testing.assert_close(linear(x, w), F.linear(x.float(), w.float()).bfloat16(), rtol=0, atol=0)
    q1, q2, k, v = _case(1, 2, 2, 30, 16, torch.float32)
    out = diff_attend(q1, q2, k, v, None, False, 0.25, torch.tensor(0.3))
    torch.testing.assert_close(out.double(), _ref(q1, q2, k, v, None, torch.tensor(0.3), 0.25), rtol=1e-5, atol=1e-6)
