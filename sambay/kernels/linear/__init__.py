"""The linears: dense (bf16/fp16 weights), int8 and int4 weights (formats in :mod:`.ref`), and the int8/int4 ones
with 8-bit activations (``*_a8``: the activation quantized per block of 32 columns, :func:`.ref.quantize_activations`).

    spec, formats, twins   linear/ref.py (quantize/dequantize; linear_ref, linear_int8_ref, linear_int4_ref, *_a8_ref)
    fast path              linear/cpu_linear.cpp (AVX2) and cpu_linear_avx512.cpp (AVX-512 + VNNI/BF16) (family
                           ``linear``, CPU only, decode-sized calls: each weight streamed once with fp32
                           accumulation; the variant chosen per call from cpuid; built by
                           :mod:`sambay.kernels.cpu_native`)

On CUDA the linears are ATen's (cuBLAS; quantized weights: the dequantize-matmul twin).
"""

from __future__ import annotations

import torch

from sambay.kernels.dispatch import needs_grad, use_fast
from sambay.kernels.linear.ref import (
    linear_int4_a8_ref,
    linear_int4_ref,
    linear_int8_a8_ref,
    linear_int8_ref,
    linear_ref,
)

__all__ = ["linear", "linear_int4", "linear_int4_a8", "linear_int8", "linear_int8_a8"]

# Decode-sized calls (at most this many rows of activations) go to the CPU kernels: they stream the weight once.
# Longer calls (prefill, training) are compute-bound: ATen's matmul (dense) or the blocked dequantize-matmul twin.
_KERNEL_ROWS = 8


def _kernel_call(x: torch.Tensor, *weights: torch.Tensor) -> str | None:
    """Why the CPU linear kernels cannot take this call, or None."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 1 <= rows <= _KERNEL_ROWS:
        return f"{rows} rows (the kernels take 1..{_KERNEL_ROWS})"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"activations in {x.dtype}"
    if needs_grad(x, *weights):
        return "a gradient is needed (the kernels have no backward)"
    if not all(w.is_contiguous() for w in weights):
        return "a non-contiguous weight"
    return None


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, N) fp32 kernel output -> (..., N) in x.dtype, bias added in fp32 (one rounding)."""
    if bias is not None:
        y = y + bias.float()
    return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _flat(x: torch.Tensor, keep_bf16: bool = False) -> torch.Tensor:
    """(..., K) -> (M, K) contiguous fp32, or bf16 kept as it is when ``keep_bf16`` (the kernels' exact bf16 path)."""
    x = x.reshape(-1, x.shape[-1])
    return (x if keep_bf16 and x.dtype == torch.bfloat16 else x.float()).contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """F.linear(x, weight, bias). A bf16/fp16 weight with a decode-sized x on CPU takes the streaming kernel (fp32
    accumulation, one rounding of the result, like ATen's bf16 matmul; bf16 x against a bf16 weight is passed as it
    is, for vdpbf16ps where the CPU has it: exact products); everything else :func:`linear_ref` (F.linear, or fp32
    blocks of a bf16 weight on CPUs without bf16 matmuls)."""
    half = weight.dtype in (torch.bfloat16, torch.float16)
    unsupported = _kernel_call(x, weight) if half else f"weight in {weight.dtype}"
    if use_fast("linear", backend, (x, weight), unsupported):
        return _finish(torch.ops.sambay_cpu.linear_dense(_flat(x, weight.dtype == torch.bfloat16), weight), x, bias)
    return linear_ref(x, weight, bias)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """x (..., K) @ dequantize_int8(qweight (N, K), scales (N,))^T + bias -> (..., N) in x.dtype."""
    if use_fast("linear", backend, (x, qweight), _kernel_call(x, qweight, scales)):
        return _finish(torch.ops.sambay_cpu.linear_int8(_flat(x), qweight, scales), x, bias)
    return linear_int8_ref(x, qweight, scales, bias)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """x (..., K) @ dequantize_int4(qweight (N, K/2), scales, mins (N, K/G), G)^T + bias -> (..., N) in x.dtype."""
    if use_fast("linear", backend, (x, qweight), _kernel_call(x, qweight, scales, mins)):
        return _finish(torch.ops.sambay_cpu.linear_int4(_flat(x), qweight, scales, mins, group_size), x, bias)
    return linear_int4_ref(x, qweight, scales, mins, group_size, bias)


def linear_int8_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """:func:`linear_int8` on x quantized to 8 bits per block of 32 columns (ref.fake_quantize_activations)."""
    if use_fast("linear", backend, (x, qweight), _kernel_call(x, qweight, scales)):
        return _finish(torch.ops.sambay_cpu.linear_int8_a8(_flat(x), qweight, scales), x, bias)
    return linear_int8_a8_ref(x, qweight, scales, bias)


def linear_int4_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """:func:`linear_int4` on x quantized to 8 bits per block of 32 columns (ref.fake_quantize_activations)."""
    if use_fast("linear", backend, (x, qweight), _kernel_call(x, qweight, scales, mins)):
        return _finish(torch.ops.sambay_cpu.linear_int4_a8(_flat(x), qweight, scales, mins, group_size), x, bias)
    return linear_int4_a8_ref(x, qweight, scales, mins, group_size, bias)
