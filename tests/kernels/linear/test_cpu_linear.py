"""sambay's CPU linear kernels (kernels/cpu/linear.cpp, linear_avx512.cpp), each instruction-set variant called by
name against the plain-PyTorch twin: bf16/fp16 dense, int8 and int4 weight-only, and both with 8-bit activations.
A variant the CPU lacks is skipped (CI machines may have AVX2 only); "auto" must pick the widest one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from sambay.kernels import active_backends
from sambay.kernels.linear import ref as quant_ref

KERNELS = active_backends("cpu")["linear"] == "sambay_cpu"
pytestmark = pytest.mark.skipif(not KERNELS, reason="sambay's CPU kernels cannot be built or run on this machine")

AVAILABLE = [name.split("+")[0] for name in torch.ops.sambay_cpu.isas()] if KERNELS else []
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in AVAILABLE, reason=f"this CPU has no {isa}"))
        for isa in ("avx2", "avx512")]
# The kernels and the twins add the same fp32 products (exact integer dot products in the 8-bit paths) in another
# order: the difference is a few fp32 ulps of the sums; measured up to ~2e-6 of max |twin| at K = 2560.
FP32_ORDER = 1e-5
SHAPES = [(1, 16), (5, 7), (33, 40), (64, 100), (17, 513), (40, 2560)]
INT4_SHAPES = [(32, 3, 32), (32, 17, 96), (64, 64, 192), (128, 5, 256), (256, 9, 512), (128, 40, 2560), (64, 7, 320)]
ops = torch.ops.sambay_cpu


def _x(rows, K, seed=0):
    return torch.randn(rows, K, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("N, K", SHAPES)
def test_dense_kernels_equal_f_linear_in_fp32(isa, rows, N, K):
    w = torch.randn(N, K)
    x = _x(rows, K)
    for wt in (w.bfloat16(), w.half()):
        assert rel_err(ops.linear_dense(x, wt, isa), x @ wt.float().T) <= FP32_ORDER
    # bf16 activations against bf16 weights: vdpbf16ps on AVX512-BF16 (exact products), else widened to fp32
    xb, wb = x.bfloat16(), w.bfloat16()
    got = ops.linear_dense(xb, wb, isa)
    assert got.dtype == torch.float32 and rel_err(got, xb.float() @ wb.float().T) <= FP32_ORDER


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("N, K", SHAPES)
def test_int8_kernels_equal_their_twins(isa, rows, N, K):
    q, s = quant_ref.quantize_int8(torch.randn(N, K))
    x = _x(rows, K)
    assert rel_err(ops.linear_int8(x, q, s, isa), quant_ref.linear_int8_ref(x, q, s)) <= FP32_ORDER
    assert rel_err(ops.linear_int8_a8(x, q, s, isa), quant_ref.linear_int8_a8_ref(x, q, s)) <= FP32_ORDER


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("G, N, K", INT4_SHAPES)
def test_int4_kernels_equal_their_twins(isa, rows, G, N, K):
    q, s, m = quant_ref.quantize_int4(torch.randn(N, K) + 0.3, G)
    x = _x(rows, K)
    if isa == "avx512" and G % 64:
        with pytest.raises(RuntimeError, match="multiple of 64"):
            ops.linear_int4(x, q, s, m, G, isa)
    else:
        assert rel_err(ops.linear_int4(x, q, s, m, G, isa), quant_ref.linear_int4_ref(x, q, s, m, G)) <= FP32_ORDER
    assert rel_err(ops.linear_int4_a8(x, q, s, m, G, isa), quant_ref.linear_int4_a8_ref(x, q, s, m, G)) <= FP32_ORDER


def test_auto_is_the_widest_variant_the_cpu_has():
    """Per call from the CPU's features: "auto" gives exactly the bits of the variant it names."""
    widest = AVAILABLE[0]
    q, s, m = quant_ref.quantize_int4(torch.randn(48, 512), 128)
    x = _x(2, 512)
    assert torch.equal(ops.linear_int4_a8(x, q, s, m, 128), ops.linear_int4_a8(x, q, s, m, 128, widest))
    assert torch.equal(ops.linear_int4(x, q, s, m, 128), ops.linear_int4(x, q, s, m, 128, widest))
    w = torch.randn(48, 512).bfloat16()
    assert torch.equal(ops.linear_dense(x.bfloat16(), w), ops.linear_dense(x.bfloat16(), w, widest))
    # groups of 32 have no AVX-512 weight-only kernel: "auto" takes the AVX2 one there
    q, s, m = quant_ref.quantize_int4(torch.randn(48, 512), 32)
    assert torch.equal(ops.linear_int4(x, q, s, m, 32), ops.linear_int4(x, q, s, m, 32, "avx2"))


def test_an_unknown_isa_is_refused_by_name():
    with pytest.raises(RuntimeError, match="isa must be 'auto', 'avx2' or 'avx512', got 'sse'"):
        ops.linear_dense(_x(1, 16), torch.randn(4, 16).bfloat16(), "sse")


# ---- 8-bit activations: the format, and its error against the weight-only product --------------------------------
def test_activation_codes_round_each_block_to_its_own_scale():
    x = torch.randn(3, 100) * torch.rand(3, 1) * 5
    x[1, 32:64] = 0  # an all-zero block: scale 0, codes 0
    q, d = quant_ref.quantize_activations(x)
    assert q.shape == (3, 128) and d.shape == (3, 4) and q.dtype == torch.int8
    assert q.abs().max() <= 127 and (q[:, 100:] == 0).all() and d[1, 1] == 0 and (q[1, 32:64] == 0).all()
    x_hat = quant_ref.fake_quantize_activations(x)
    bound = (d / 2).repeat_interleave(32, dim=1)[:, :100]  # half a step, up to the fp32 rounding of q * d
    assert ((x - x_hat).abs() <= bound * (1 + 2**-20) + x.abs() * 2**-23).all()


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_8bit_activations_stay_within_their_rounding_of_the_weight_only_product(weights):
    """|y_a8 - y| <= sum_k |w_nk| |x_k - x_hat_k| <= sum_k |w_nk| d_b(k) / 2: the bound the activation rounding
    implies, checked on the kernels (auto) against the weight-only twin."""
    N, K = 64, 2560
    x = _x(2, K) * torch.linspace(0.1, 3, K)  # blocks of different scales
    if weights == "int8":
        q, s = quant_ref.quantize_int8(torch.randn(N, K))
        w = quant_ref.dequantize_int8(q, s)
        got, ref = ops.linear_int8_a8(x, q, s), quant_ref.linear_int8_ref(x, q, s)
    else:
        q, s, m = quant_ref.quantize_int4(torch.randn(N, K), 128)
        w = quant_ref.dequantize_int4(q, s, m, 128)
        got, ref = ops.linear_int4_a8(x, q, s, m, 128), quant_ref.linear_int4_ref(x, q, s, m, 128)
    _, d = quant_ref.quantize_activations(x)
    half_step = (d / 2).repeat_interleave(32, dim=1)[:, :K]
    bound = half_step.double() @ w.abs().double().T + 1e-5 * ref.abs().max()
    err = (got.double() - ref.double()).abs()
    assert (err <= bound).all()
    assert err.max() > 0  # the mode does change the math
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.9999
