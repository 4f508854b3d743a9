"""Weight-only quantized formats and the plain-PyTorch twins of the linears that read them.

int8, per output channel (symmetric):
    qweight (N, K) int8, scales (N,) fp32;                     w[n, k] = qweight[n, k] * scales[n]
int4, per group of ``group_size`` input columns (asymmetric):
    qweight (N, K/2) uint8, scales and mins (N, K/G) bf16;     w[n, k] = q[n, k] * scales[n, k//G] + mins[n, k//G]
    with q in [0, 15]; byte j of a row holds column 2j in its low nibble and column 2j+1 in its high nibble.

8-bit activations (optional, ``activations="int8"`` in quant.py), dynamic, per block of ``ACT_BLOCK`` columns of each
activation row (as llama.cpp's Q8_0):  d = max|x_b| / 127 (fp32), q = round-half-even(x / d) in [-127, 127]
(q = 0 for an all-zero block), x_hat = q * d. The ``*_a8`` twins run the weight-only twin on x_hat; the kernels
take integer dot products of q with the weight codes. Per element |x - x_hat| <= d / 2 = max|x_b| / 254.

The twins dequantize to fp32 and multiply in fp32, so they equal the compiled kernels
(``cpu_linear.cpp``) up to the order of the fp32 sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT4_GROUP_SIZES = (32, 64, 128, 256)


# Weights are quantized in blocks of rows of at most this many elements (1 MB of fp32): quantizing the 1 GB LM head
# in one piece would need several GB of fp32 temporaries. Every step is per row, so the blocks change no bit.
_QUANTIZE_BLOCK = 1 << 18


def _row_blocks(N: int, K: int) -> range:
    return range(0, N, max(1, _QUANTIZE_BLOCK // max(1, K)))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> qweight (N, K) int8, scales (N,) fp32 with scale = max|w_n| / 127 (1 for an all-zero row)."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8, device=w.device)
    scales = torch.empty(N, dtype=torch.float32, device=w.device)
    step = _row_blocks(N, K).step
    for a in _row_blocks(N, K):
        wf = w[a:a + step].detach().float()
        amax = wf.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q[a:a + step] = torch.round(wf / s[:, None]).clamp_(-127, 127)
        scales[a:a + step] = s
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """-> (N, K) fp32."""
    return qweight.float() * scales.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> qweight (N, K/2) uint8, scales (N, K/G) bf16, mins (N, K/G) bf16.

    Each group maps [min, max] onto 0..15; scale and min are rounded to bf16 first, then q is chosen against the
    rounded values, so the dequantized weight is exactly what the kernels use."""
    N, K = w.shape
    if group_size not in INT4_GROUP_SIZES or K % group_size:
        raise ValueError(f"int4: group_size must be one of {INT4_GROUP_SIZES} and divide the {K} input columns, "
                         f"got {group_size}")
    G = group_size
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(N, K // G, dtype=torch.bfloat16, device=w.device)
    mins = torch.empty(N, K // G, dtype=torch.bfloat16, device=w.device)
    step = _row_blocks(N, K).step
    for a in _row_blocks(N, K):
        wg = w[a:a + step].detach().float().view(-1, K // G, G)
        lo, hi = wg.amin(-1), wg.amax(-1)
        mn = lo.to(torch.bfloat16)
        span = (hi - mn.float()).clamp_min(0)
        sc = torch.where(span > 0, span / 15.0, torch.ones_like(span)).to(torch.bfloat16)
        q = torch.round((wg - mn.float()[..., None]) / sc.float()[..., None]).clamp_(0, 15).to(torch.uint8)
        q = q.view(-1, K)
        packed[a:a + step] = q[:, 0::2] | (q[:, 1::2] << 4)
        scales[a:a + step], mins[a:a + step] = sc, mn
    return packed, scales, mins


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values in [0, 15]."""
    N, half = qweight.shape
    return torch.stack([qweight & 15, qweight >> 4], dim=-1).view(N, 2 * half)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    """-> (N, K) fp32."""
    q = unpack_int4(qweight).float()
    N, K = q.shape
    w = q.view(N, K // group_size, group_size) * scales.float()[..., None] + mins.float()[..., None]
    return w.view(N, K)


# Weights are dequantized in blocks of at most this many elements (64 MB of fp32): a 200064 x 2560 LM head
# would otherwise need a 2 GB temporary.
_BLOCK = 1 << 24


def _blocked(x: torch.Tensor, N: int, K: int, deq, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x.float(), deq(n0, n1) for row blocks, bias) -> (..., N) in x.dtype."""
    xf = x.float()
    rows = max(1, _BLOCK // max(1, K))
    parts = [F.linear(xf, deq(n0, min(N, n0 + rows))) for n0 in range(0, N, rows)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear_int8_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x.dtype: dequantize (in row blocks), then fp32 matmuls."""
    N, K = qweight.shape
    return _blocked(x, N, K, lambda a, b: dequantize_int8(qweight[a:b], scales[a:b]), bias)


def linear_int4_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x.dtype: dequantize (in row blocks), then fp32 matmuls."""
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    return _blocked(x, N, K, lambda a, b: dequantize_int4(qweight[a:b], scales[a:b], mins[a:b], group_size), bias)


# ------------------------------------------------------------------------------------------------ dense
def _cpu_has_half_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); read once. It decides speed, not math."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


_HALF_MATMUL = _cpu_has_half_matmul()
# Weights are upcast in blocks of at most this many elements (64 MB of fp32), whatever the matrix size.
_UPCAST_BLOCK = 1 << 24


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) in x.dtype. A bf16/fp16 weight on a CPU without native bf16 matmuls (AVX2: ATen's
    bf16 GEMM runs at ~8 GFLOP/s a core against ~50 for fp32) is upcast to fp32 a block of rows at a time and
    multiplied in fp32, the result rounded once: the same math (fp32 accumulation), 4-6x faster for prefill."""
    if _HALF_MATMUL or x.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return F.linear(x, weight, bias)
    N, K = weight.shape
    rows = max(1, _UPCAST_BLOCK // max(1, K))
    xf = x.float()
    parts = [F.linear(xf, weight[n0:n0 + rows].float()) for n0 in range(0, N, rows)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------ 8-bit activations
ACT_BLOCK = 32


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> codes (..., ceil(K/32)*32) int8 (the last block zero-padded), scales (..., ceil(K/32)) fp32."""
    K = x.shape[-1]
    pad = -K % ACT_BLOCK
    xb = F.pad(x.detach().float(), (0, pad)).unflatten(-1, (-1, ACT_BLOCK))
    amax = xb.abs().amax(-1)
    d = amax / 127.0
    safe = torch.where(amax > 0, d, torch.ones_like(d))[..., None]
    q = torch.where(amax[..., None] > 0, torch.round(xb / safe), torch.zeros_like(xb)).clamp_(-127, 127)
    return q.to(torch.int8).flatten(-2), d


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> x_hat (..., K) fp32, the value the 8-bit-activation kernels compute with. The gradient passes
    straight through (d x_hat / d x = 1), so the float parameters before a quantized linear can still be trained."""
    K = x.shape[-1]
    q, d = quantize_activations(x)
    x_hat = (q.float().unflatten(-1, (-1, ACT_BLOCK)) * d[..., None]).flatten(-2)[..., :K]
    return _StraightThrough.apply(x, x_hat) if x.requires_grad else x_hat


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_hat):
        ctx.dtype = x.dtype
        return x_hat

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def linear_int8_a8_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear_int8_ref on the 8-bit activation x_hat -> (..., N) in x.dtype."""
    return linear_int8_ref(fake_quantize_activations(x), qweight, scales, bias).to(x.dtype)


def linear_int4_a8_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear_int4_ref on the 8-bit activation x_hat -> (..., N) in x.dtype."""
    return linear_int4_ref(fake_quantize_activations(x), qweight, scales, mins, group_size, bias).to(x.dtype)
