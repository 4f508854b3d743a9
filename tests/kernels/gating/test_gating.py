"""silu_mul Triton kernel vs its PyTorch twin (:func:`silu_mul_ref`).

Small odd shapes run under Triton's CPU interpreter (or compiled, on a CUDA machine); ``cuda``-marked
tests run realistic bf16 sizes and are skipped without a GPU. Outputs are allocated NaN-poisoned, so an
element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import max_abs_err

pytest.importorskip("triton")

from sambay.kernels.gating.ref import silu_mul_ref
from sambay.kernels.gating.triton_silu_mul import _as_rows, _silu_mul_bwd, _silu_mul_fwd, silu_mul_triton

pytestmark = pytest.mark.triton

C = 37  # odd, and larger than the small test tile (16), so rows and columns both end in a partial tile

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]

# The default tiling, and a small one so every tensor spans several row and column tiles with ragged edges.
TILES = [pytest.param({}, id="default-tiles"), pytest.param({"block_r": 4, "block_c": 16}, id="small-tiles")]


def _randn(*shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(dtype=dtype, device=device)


# Each layout: (leaves, views) where views(*leaves) -> (gate, value), and whether it needs no copy.
def _contiguous(dt, dev):
    return [_randn(3, 5, C, dtype=dt, device=dev, seed=0), _randn(3, 5, C, dtype=dt, device=dev, seed=1)], \
        (lambda g, v: (g, v)), True


def _fused_halves(dt, dev):
    # fc1's output (..., 2C) split into gate and value halves: row stride 2C, no copy.
    return [_randn(2, 7, 2 * C, dtype=dt, device=dev, seed=2)], (lambda u: (u[..., :C], u[..., C:])), True


def _fused_halves_transposed(dt, dev):
    # (T, B, 2C) viewed as (B, T, 2C): two row levels that do not merge.
    def views(u):
        ut = u.transpose(0, 1)
        return ut[..., :C], ut[..., C:]
    return [_randn(7, 3, 2 * C, dtype=dt, device=dev, seed=3)], views, True


def _sliced_leading(dt, dev):
    # every other time step of a fused tensor, from offset 1: leading dims still collapse to one row stride
    def views(u):
        us = u[1:, 1::2]
        return us[..., C:], us[..., :C]
    return [_randn(4, 9, 2 * C, dtype=dt, device=dev, seed=4)], views, True


def _expanded_value(dt, dev):
    # value broadcast over the batch dim (stride 0)
    return [_randn(3, 5, C, dtype=dt, device=dev, seed=5), _randn(5, C, dtype=dt, device=dev, seed=6)], \
        (lambda g, v: (g, v.expand(3, 5, C))), True


def _fp32_value(dt, dev):
    # value may stay fp32 (e.g. a scan output) while gate is bf16/fp16
    return [_randn(4, 3, C, dtype=dt, device=dev, seed=7), _randn(4, 3, C, dtype=torch.float32, device=dev, seed=8)], \
        (lambda g, v: (g, v)), True


def _one_dim(dt, dev):
    return [_randn(2 * C, dtype=dt, device=dev, seed=9)], (lambda u: (u[:C], u[C:])), True


def _three_level_permute(dt, dev):
    # three leading levels that cannot collapse into two: the launcher falls back to a copy
    def views(u):
        up = u.permute(1, 2, 0, 3)
        return up[..., :C], up[..., C:]
    return [_randn(4, 3, 2, 2 * C, dtype=dt, device=dev, seed=10)], views, False


def _strided_last_dim(dt, dev):
    # last dim not unit-stride (a transposed matrix): falls back to a copy
    return [_randn(C, 6, dtype=dt, device=dev, seed=11), _randn(6, C, dtype=dt, device=dev, seed=12)], \
        (lambda g, v: (g.t(), v)), False


LAYOUTS = [
    pytest.param(_contiguous, id="contiguous"),
    pytest.param(_fused_halves, id="fused-halves"),
    pytest.param(_fused_halves_transposed, id="fused-halves-transposed-leading"),
    pytest.param(_sliced_leading, id="sliced-leading"),
    pytest.param(_expanded_value, id="expanded-value"),
    pytest.param(_fp32_value, id="fp32-value"),
    pytest.param(_one_dim, id="1d"),
    pytest.param(_three_level_permute, id="3-level-permute-copies"),
    pytest.param(_strided_last_dim, id="strided-last-dim-copies"),
]


def _cotangent(kind, shape, dtype, device):
    """Backward's incoming gradient: a fresh tensor, a strided slice, or a stride-0 expansion."""
    if kind == "random":
        return _randn(*shape, dtype=dtype, device=device, seed=20)
    if kind == "strided":
        return _randn(*shape[:-1], 2 * shape[-1] + 3, dtype=dtype, device=device, seed=21)[..., 3:3 + shape[-1]]
    return _randn(1, dtype=dtype, device=device, seed=22).expand(shape)   # what .sum().backward() sends


def _check(actual, expected, within_ulps):
    """fp32: a few ulps of the exp; bf16/fp16: at most one ulp from the twin (same fp32 math, one rounding)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "NaN in output: an element was not written"
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        assert within_ulps(actual, expected, 1), f"more than 1 ulp off: max diff " \
            f"{(actual.float() - expected.float()).abs().max().item()}"


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_twin(dtype, layout, tiles, kernel_device, poison_empty, within_ulps):
    leaves, views, _ = layout(dtype, kernel_device)
    gate, value = views(*leaves)
    expected = silu_mul_ref(gate, value)
    poison_empty.clear()
    out = silu_mul_triton(gate, value) if not tiles else _silu_mul_fwd(gate, value, **tiles)
    assert poison_empty, "the output was not allocated through torch.empty; the NaN poison did not apply"
    assert out.is_contiguous()
    _check(out, expected, within_ulps)


@pytest.mark.parametrize("layout", [p for p in LAYOUTS if p.values[0](torch.float32, "cpu")[2]])
def test_row_strided_views_are_not_copied(layout):
    """Views expressible as rows with (up to two levels of) row strides reach the kernel as they are."""
    leaves, views, _ = layout(torch.float32, "cpu")
    gate, value = views(*leaves)
    (g2, v2), _, _, _ = _as_rows(tuple(gate.shape), [gate, value])
    assert g2 is gate and v2 is value


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")   # numpy, in the interpreter
def test_extreme_values_match_twin(kernel_device, poison_empty, within_ulps):
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 80.0, -80.0, 100.0, -100.0, 1e4, -1e4,
                            math.inf, -math.inf, math.nan], device=kernel_device)
    gate = torch.cat([special, _randn(C, dtype=torch.float32, device=kernel_device, seed=30)])
    value = _randn(gate.numel(), dtype=torch.float32, device=kernel_device, seed=31)
    # fp32: the kernel's exp and PyTorch's may differ by an ulp, which the divide and multiply can double.
    for dtype, ulps in ((torch.float32, 4), (torch.bfloat16, 1)):
        g, v = gate.to(dtype), value.to(dtype)
        assert within_ulps(silu_mul_triton(g, v), silu_mul_ref(g, v), ulps)


def test_reads_stay_inside_the_view(kernel_device, poison_empty):
    """Inputs sit inside NaN-filled storage: any read outside the view (bad mask or stride) shows as NaN."""
    buf = torch.full((6, 3 * C + 5), math.nan, device=kernel_device)
    buf[1:5, 2:2 + 2 * C] = _randn(4, 2 * C, dtype=torch.float32, device=kernel_device, seed=32)
    gate, value = buf[1:5, 2:2 + C], buf[1:5, 2 + C:2 + 2 * C]
    for tiles in ({}, {"block_r": 4, "block_c": 16}, {"block_r": 8, "block_c": 64}):
        out = _silu_mul_fwd(gate, value, **tiles)
        torch.testing.assert_close(out, silu_mul_ref(gate, value), rtol=1e-5, atol=1e-6)
    cot = _randn(4, C, dtype=torch.float32, device=kernel_device, seed=33)
    dgate, dvalue = _silu_mul_bwd(cot, gate, value, block_r=4, block_c=16)
    assert not dgate.isnan().any() and not dvalue.isnan().any()


def test_empty_and_scalar(kernel_device):
    empty = torch.empty(0, 3, C, device=kernel_device)
    assert silu_mul_triton(empty, empty).shape == (0, 3, C)
    g = torch.tensor(1.5, device=kernel_device, requires_grad=True)
    v = torch.tensor(-2.0, device=kernel_device, requires_grad=True)
    out = silu_mul_triton(g, v)
    assert out.shape == ()
    torch.testing.assert_close(out, silu_mul_ref(g, v))
    out.backward()
    assert g.grad is not None and v.grad is not None


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        silu_mul_triton(torch.zeros(2, 3), torch.zeros(2, 4))


# ----------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("cot_kind", ["random", "strided", "expanded"])
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel_matches_twin(dtype, layout, tiles, cot_kind, kernel_device, poison_empty, within_ulps):
    """The backward kernel's (dgate, dvalue) vs autograd through the twin, per element (before any
    reduction autograd adds for expanded inputs)."""
    leaves, views, _ = layout(dtype, kernel_device)
    leaves = [leaf.requires_grad_() for leaf in leaves]
    gate, value = views(*leaves)
    cot = _cotangent(cot_kind, tuple(gate.shape), dtype, kernel_device)
    exp_dgate, exp_dvalue = torch.autograd.grad(silu_mul_ref(gate, value), (gate, value), cot)
    poison_empty.clear()
    dgate, dvalue = _silu_mul_bwd(cot, gate.detach(), value.detach(), **tiles)
    assert len(poison_empty) == 2
    _check(dgate, exp_dgate, within_ulps)
    _check(dvalue, exp_dvalue, within_ulps)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matches_twin(dtype, layout, kernel_device, poison_empty):
    """End to end through autograd: gradients reach the leaves (through slices, expands, transposes)."""
    leaves, views, _ = layout(dtype, kernel_device)
    cot = None
    grads = []
    for fn in (silu_mul_triton, silu_mul_ref):
        ls = [leaf.clone().requires_grad_() for leaf in leaves]
        out = fn(*views(*ls))
        cot = _randn(*out.shape, dtype=dtype, device=kernel_device, seed=40) if cot is None else cot
        out.backward(cot)
        grads.append([leaf.grad for leaf in ls])
    for actual, expected in zip(*grads):
        assert not actual.isnan().any()
        # A few ulps: autograd sums the per-element grads of an expanded value, and each summand may
        # already be one ulp off; the sum's error is relative to the summands, hence the atol.
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(actual, expected, rtol=4 * eps, atol=4 * eps * expected.abs().max().item())


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["gate-only", "value-only"])
def test_backward_skips_unneeded_grads(needs, kernel_device):
    gate = _randn(5, C, dtype=torch.float32, device=kernel_device, seed=50).requires_grad_(needs[0])
    value = _randn(5, C, dtype=torch.float32, device=kernel_device, seed=51).requires_grad_(needs[1])
    silu_mul_triton(gate, value).sum().backward()
    gate_r, value_r = gate.detach().clone().requires_grad_(needs[0]), value.detach().clone().requires_grad_(needs[1])
    silu_mul_ref(gate_r, value_r).sum().backward()
    for t, r in ((gate, gate_r), (value, value_r)):
        if r.grad is None:
            assert t.grad is None
        else:
            torch.testing.assert_close(t.grad, r.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fp64_gradcheck(kernel_device):
    """fp64 inputs compute in fp64 (like the twin), so gradcheck holds through the Triton backward."""
    u = _randn(2, 3, 2 * 5, dtype=torch.float64, device=kernel_device, seed=60).requires_grad_()

    def halves(t):
        return t[..., :5], t[..., 5:]
    torch.testing.assert_close(silu_mul_triton(*halves(u)), silu_mul_ref(*halves(u)), rtol=1e-13, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: silu_mul_triton(*halves(t)), (u,))


@pytest.mark.slow
def test_gpu_codegen_vectorizes(gpu_codegen):
    """Without a GPU: the kernels compile for sm_80 and sm_90, and bf16 fused halves (C = 4096, so row
    strides and the value pointer are 16-byte aligned) get 16-byte vector loads and stores."""
    from sambay.kernels.gating.triton_silu_mul import _silu_mul_config

    block_r, block_c, num_warps = _silu_mul_config(4096, None, None)
    tiles = {"BLOCK_R": block_r, "BLOCK_C": block_c, "ACC": {"tl": "float32"}}
    ints = {"R": "i32", "C": "i32", "D1": "i32"}
    fwd_sig = {"gate_ptr": "*bf16", "value_ptr": "*bf16", "out_ptr": "*bf16", **ints,
               **dict.fromkeys(["g_s0", "g_s1", "v_s0", "v_s1"], "i32")}
    bwd_sig = {**dict.fromkeys(["grad_ptr", "gate_ptr", "value_ptr", "dgate_ptr", "dvalue_ptr"], "*bf16"), **ints,
               **dict.fromkeys(["d_s0", "d_s1", "g_s0", "g_s1", "v_s0", "v_s1"], "i32")}
    aligned = lambda sig: [k for k in sig if k not in ("R", "D1")]
    cases = [
        {"module": "sambay.kernels.gating.triton_silu_mul", "kernel": "_silu_mul_fwd_kernel", "signature": fwd_sig,
         "constexprs": {**tiles, "TWO_LEVELS": two}, "divisible": aligned(fwd_sig), "archs": [80, 90],
         "options": {"num_warps": num_warps}} for two in (False, True)
    ] + [
        {"module": "sambay.kernels.gating.triton_silu_mul", "kernel": "_silu_mul_bwd_kernel", "signature": bwd_sig,
         "constexprs": {**tiles, "TWO_LEVELS": False, "NEED_DGATE": True, "NEED_DVALUE": True},
         "divisible": aligned(bwd_sig), "archs": [80, 90], "options": {"num_warps": num_warps}},
    ]
    results = gpu_codegen(cases)
    assert len(results) == 6
    for r in results:
        assert r["ld_v4"] > 0 and r["st_v4"] > 0, r


# --------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows,c", [pytest.param(4096, 4096, id="16M-elements"),
                                    pytest.param(3 * 1021, 5 * 1031, id="odd-15.8M-elements")])
def test_cuda_bf16_realistic(rows, c, within_ulps):
    """bf16 fused halves at 16M elements: forward within 1 ulp of the twin, and both forward and backward
    no worse than twice the twin's own error against the fp32 math."""
    from sambay.kernels import triton_interpreter

    if triton_interpreter():
        pytest.skip("TRITON_INTERPRET=1 is set; realistic sizes need the compiled kernels")
    gen = torch.Generator(device="cuda").manual_seed(0)
    u = (torch.randn(rows, 2 * c, device="cuda", generator=gen) * 3).to(torch.bfloat16).requires_grad_()
    cot = torch.randn(rows, c, device="cuda", generator=gen).to(torch.bfloat16)
    u32 = u.detach().float().requires_grad_()
    exact = silu_mul_ref(u32[:, :c], u32[:, c:])                   # fp32 math, no rounding
    exact.backward(cot.float())

    results = {}
    for name, fn in (("triton", silu_mul_triton), ("torch", silu_mul_ref)):
        uu = u.detach().clone().requires_grad_()
        out = fn(uu[:, :c], uu[:, c:])
        out.backward(cot)
        results[name] = (out, uu.grad)
    (out_t, grad_t), (out_r, grad_r) = results["triton"], results["torch"]
    assert not out_t.isnan().any() and not grad_t.isnan().any()
    assert within_ulps(out_t, out_r, 1)
    assert max_abs_err(out_t, exact) <= 2 * max_abs_err(out_r, exact) + 1e-6
    assert max_abs_err(grad_t, u32.grad) <= 2 * max_abs_err(grad_r, u32.grad) + 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_dispatch_uses_triton(monkeypatch):
    """backend="auto" sends CUDA tensors to the Triton kernel."""
    from sambay.kernels import silu_mul
    from sambay.kernels.gating import triton_silu_mul as gating

    calls = []
    real = gating.silu_mul_triton
    monkeypatch.setattr(gating, "silu_mul_triton", lambda g, v: calls.append(1) or real(g, v))
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    silu_mul(x, x)
    assert calls == [1]
