"""The public ops: each asks the dispatcher (:mod:`sambay.kernels.dispatch`) which implementation runs, then
calls the fast path (Triton kernel or CUDA adapter) or the ``"torch"`` twin, with one signature for all.

    family    op                                   fast path                      twin
    gating    silu_mul, gmu                        triton_silu_mul, triton_gmu    reference (silu_mul_ref, gmu_ref)
    conv      causal_conv1d, causal_conv1d_step    cuda_adapters (causal-conv1d)  twins
    scan      selective_scan, selective_step       cuda_adapters (mamba-ssm)      twins
    attention attend, attend_pair                  cuda_adapters (flash-attn)     twins
    linear    linear, linear_int8, linear_int4     cpu_native (CPU, decode rows)  twins.linear, quant_ref
"""

from __future__ import annotations

import contextlib

import torch

from sambay.kernels import cuda_adapters, quant_ref, twins
from sambay.kernels.dispatch import needs_grad, use_fast
from sambay.kernels.reference import silu_mul_ref


def _device_of(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (a model on cuda:1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- gating
def silu_mul(gate: torch.Tensor, value: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * value in fp32, rounded once to ``gate.dtype``. See :func:`silu_mul_ref`."""
    if use_fast("gating", backend, (gate, value)):
        from sambay.kernels.triton_silu_mul import silu_mul_triton

        with _device_of(gate):
            return silu_mul_triton(gate, value)
    return silu_mul_ref(gate, value)


def gmu(x: torch.Tensor, in_proj_weight: torch.Tensor, memory: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(x @ in_proj_weight^T) * memory as one fused op. See :func:`gmu_ref`."""
    if use_fast("gating", backend, (x, in_proj_weight, memory)):
        from sambay.kernels.triton_gmu import gmu_triton

        with _device_of(x):
            return gmu_triton(x, in_proj_weight, memory)
    return silu_mul_ref(linear(x, in_proj_weight, None, backend), memory)  # gmu_ref, its matmul through linear


# ------------------------------------------------------------------------------------------------- conv
def causal_conv1d(history, weight, bias, backend: str = "auto"):
    """silu(causal depthwise conv) continuing a history: (B, E, K-1+T) -> (B, E, T). See ``causal_conv1d_ref``."""
    if use_fast("conv", backend, (history, weight), cuda_adapters.unsupported_conv(history, weight, bias)):
        return cuda_adapters.causal_conv1d(history, weight, bias)
    return twins.causal_conv1d(history, weight, bias)


def causal_conv1d_step(conv_state, x, weight, bias, backend: str = "auto"):
    """One decode step of the conv, shifting ``conv_state`` (B, E, K-1) in place; x (B, E) -> (B, E)."""
    if use_fast("conv", backend, (conv_state, x, weight), cuda_adapters.unsupported_conv(x, weight, bias)):
        return cuda_adapters.causal_conv1d_step(conv_state, x, weight, bias)
    return twins.causal_conv1d_step(conv_state, x, weight, bias)


# ------------------------------------------------------------------------------------------------- scan
def selective_scan(x, dt, A, B, C, D, z=None, dt_bias=None, s0=None, backend: str = "auto"):
    """The chunk scan with delta = softplus(dt + dt_bias). See ``selective_scan_ref`` for shapes.
    A chunk that continues a state (s0 given) cannot use the CUDA kernel: "auto" takes the twin."""
    if use_fast("scan", backend, (x, dt, B, C), cuda_adapters.unsupported_scan(x, dt, B, C, z, s0)):
        return cuda_adapters.selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias)
    return twins.selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, s0=s0)


def selective_step(state, x, dt, A, B, C, D, z=None, dt_bias=None, backend: str = "auto"):
    """One recurrence step updating ``state`` (B, E, N) in place. See ``selective_step_ref``."""
    if use_fast("scan", backend, (state, x, dt, B, C)):
        return cuda_adapters.selective_step(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias)
    return twins.selective_step(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias)


# -------------------------------------------------------------------------------------------- attention
def attend(q, k, v, mask, causal: bool, scale: float, dropout_p: float = 0.0, flash=None,
           backend: str = "auto") -> torch.Tensor:
    """One attention map, softmax(q k^T * scale) v. See ``attend_ref``. ``flash`` is (causal, window) when the
    call's visibility is exactly flash-attn's bottom-right causal (+ window of ``window`` keys) with no padding,
    else None; ``mask``/``causal`` describe the same visibility for the twin."""
    if use_fast("attention", backend, (q, k, v), cuda_adapters.unsupported_flash(q, k, v, flash, dropout_p)):
        return cuda_adapters.attend_flash(q, k, v, flash, scale, dropout_p)
    return twins.attend(q, k, v, mask, causal, scale, dropout_p)


def attend_pair(q1, q2, k, v, mask, causal: bool, scale: float, dropout_p: float = 0.0, flash=None,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps of differential attention: (attend(q1, k[:, 0], v), attend(q2, k[:, 1], v)).
    Args: q1, q2 (B, Hq/2, tq, D); k (B, 2, G, tk, D) the two key stripes; v (B, G, tk, Dv)."""
    if use_fast("attention", backend, (q1, k, v), cuda_adapters.unsupported_flash(q1, k, v, flash, dropout_p)):
        return (cuda_adapters.attend_flash(q1, k[:, 0], v, flash, scale, dropout_p),
                cuda_adapters.attend_flash(q2, k[:, 1], v, flash, scale, dropout_p))
    return twins.attend_pair(q1, q2, k, v, mask, causal, scale, dropout_p)


def diff_attend(q1, q2, k, v, mask, causal: bool, scale: float, lam, dropout_p: float = 0.0, flash=None,
                backend: str = "auto") -> torch.Tensor:
    """Differential attention before the sub-layer norm: attend(q1, k[:, 0], v) - lam * attend(q2, k[:, 1], v).

    Args: q1, q2 (B, Hq/2, tq, D); k (B, 2, G, tk, D); v (B, G, tk, 2D); lam a 0-d tensor. Returns (B, Hq/2, tq, 2D).
    One decode row (tq = 1, no dropout, no gradient) on CUDA takes the flash-decoding kernel (family ``decode``):
    both maps from one read of K and V, split over the context; everything else :func:`attend_pair`. Inside
    torch.compile the kernel is not used (its launcher is plain Python; the compiler fuses the twin instead).
    """
    if q1.shape[2] == 1 and dropout_p == 0.0 and not (torch.is_grad_enabled() and q1.requires_grad) \
            and not torch.compiler.is_compiling() and use_fast("decode", backend, (q1, k, v)):
        from sambay.kernels.diff_decode import diff_decode

        B, H2, _, D = q1.shape
        q = torch.stack([q1[:, :, 0], q2[:, :, 0]], dim=2).view(B, 2 * H2, D)  # checkpoint order 2j, 2j+1
        valid = torch.ones(B, k.shape[-2], dtype=torch.bool, device=k.device) if mask is None else mask[:, 0, 0]
        with _device_of(q):
            return diff_decode(q, k, v, valid, lam, scale, backend="cuda")[:, :, None]
    decode_cpu = q1.shape[2] == 1 and dropout_p == 0.0
    if decode_cpu and use_fast("cpu_decode", backend, (q1, k, v), _cpu_decode_call(q1, k, v, lam)):
        from sambay.kernels.cpu_native import diff_decode_cpu

        return diff_decode_cpu(q1, q2, k, v, None if mask is None else mask[:, 0, 0], lam, scale)
    o1, o2 = attend_pair(q1, q2, k, v, mask, causal, scale, dropout_p, flash, backend)
    return o1 - lam * o2


def _cpu_decode_call(q1, k, v, lam) -> str | None:
    """Why the CPU decode-attention kernels cannot take this call, or None."""
    if k.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not (q1.dtype == k.dtype == v.dtype):
        return f"q/k/v in {q1.dtype}/{k.dtype}/{v.dtype} (the kernels read bf16, fp16 or fp32)"
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        return "K/V without a unit last stride"
    if needs_grad(q1, k, v, lam):
        return "a gradient is needed (the kernels have no backward)"
    return None


# ----------------------------------------------------------------------------------------------- linear
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


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """F.linear(x, weight, bias). A bf16/fp16 weight with a decode-sized x on CPU takes the streaming kernel (fp32
    accumulation, one rounding of the result, like ATen's bf16 matmul); everything else :func:`twins.linear`
    (F.linear, or fp32 blocks of a bf16 weight on CPUs without bf16 matmuls)."""
    half = weight.dtype in (torch.bfloat16, torch.float16)
    unsupported = _kernel_call(x, weight) if half else f"weight in {weight.dtype}"
    if use_fast("linear", backend, (x, weight), unsupported):
        return _finish(torch.ops.sambay_cpu.linear_dense(_flat(x), weight), x, bias)
    return twins.linear(x, weight, bias)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """x (..., K) @ dequantize_int8(qweight (N, K), scales (N,))^T + bias -> (..., N) in x.dtype."""
    if use_fast("linear", backend, (x, qweight), _kernel_call(x, qweight, scales)):
        return _finish(torch.ops.sambay_cpu.linear_int8(_flat(x), qweight, scales), x, bias)
    return quant_ref.linear_int8_ref(x, qweight, scales, bias)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """x (..., K) @ dequantize_int4(qweight (N, K/2), scales, mins (N, K/G), G)^T + bias -> (..., N) in x.dtype."""
    if use_fast("linear", backend, (x, qweight), _kernel_call(x, qweight, scales, mins)):
        return _finish(torch.ops.sambay_cpu.linear_int4(_flat(x), qweight, scales, mins, group_size), x, bias)
    return quant_ref.linear_int4_ref(x, qweight, scales, mins, group_size, bias)
