"""Every call into the CUDA packages of the ``cuda`` extra, behind the twins' signatures.

causal-conv1d (``causal_conv1d_fn``/``causal_conv1d_update``), mamba-ssm (``selective_scan_fn`` and its
Triton ``selective_state_update``) and flash-attn (``flash_attn_func``). Each adapter meets the upstream
kernel's contract (checked on CPU against the real packages by tests/kernels/test_upstream_contracts.py, which
cites the upstream lines): channels-before-time layouts, unit last strides, 16-byte aligned rows for the
vectorized loads, the input dtype for delta/B/C/z, fp32 A/D/delta_bias, a dt_bias tensor for the decode step.
:func:`unsupported_scan` and :func:`unsupported_flash` say when a call cannot be met (the dispatcher then takes
the twin, or raises for ``backend="cuda"``). Imports happen inside the adapters, never at module import.
"""

from __future__ import annotations

import torch

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_VECTOR_BYTES = 16


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is unit-stride and its base and row strides are multiples of 16 bytes
    (the kernels' vector loads), else a fresh contiguous copy.

    The conv output continues a history, so the scan input is usually a view 3 elements into its storage; the
    scan kernel loads rows as 16-byte vectors when T is a multiple of its block (selective_scan_fwd_kernel.cuh
    :315) and upstream only copies when stride(-1) != 1, so a misaligned view would fault ("misaligned address").
    """
    es = t.element_size()
    ok = (t.stride(-1) == 1 or t.shape[-1] == 1) and t.data_ptr() % _VECTOR_BYTES == 0 and all(
        size <= 1 or stride * es % _VECTOR_BYTES == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------------- conv
def unsupported_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why causal-conv1d cannot take this call, or None (causal_conv1d.cpp:160-189)."""
    if x.dtype not in _KERNEL_DTYPES or weight.dtype not in _KERNEL_DTYPES:
        return f"dtypes {x.dtype}/{weight.dtype} (the kernel takes fp32/fp16/bf16)"
    if not 2 <= weight.shape[1] <= 4:
        return f"conv width {weight.shape[1]} (the kernel takes 2..4)"
    if bias is not None and bias.dtype != weight.dtype:
        return f"bias dtype {bias.dtype} != weight dtype {weight.dtype}"
    return None


def causal_conv1d(history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """causal_conv1d_fn over the history. (B, E, K-1+T) -> (B, E, T), contiguous and 16-byte aligned."""
    from causal_conv1d import causal_conv1d_fn

    K = weight.shape[1]
    # The kernel zero-pads K-1 steps on the left; running it over the history and dropping the first K-1
    # outputs gives exactly the conv that continues from the history. The kept part is copied out so the scan
    # reads aligned rows (see _aligned).
    out = causal_conv1d_fn(_aligned(history), weight.contiguous(), bias, activation="silu")
    return out[:, :, K - 1:].contiguous()


def causal_conv1d_step(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """causal_conv1d_update: one step, shifting conv_state (B, E, K-1) in place. x (B, E) -> (B, E)."""
    from causal_conv1d import causal_conv1d_update

    out = causal_conv1d_update(x.to(conv_state.dtype), conv_state, weight.contiguous(), bias, activation="silu")
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------- scan
def unsupported_scan(x, dt, B, C, z, s0=None) -> str | None:
    """Why mamba_ssm cannot take this call, or None (selective_scan.cpp:235-303)."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"input dtype {x.dtype} (the kernel takes fp32/fp16/bf16)"
    others = {"dt": dt, "B": B, "C": C} | ({"z": z} if z is not None else {})
    wrong = {name: t.dtype for name, t in others.items() if t.dtype != x.dtype}
    if wrong:
        return f"the kernel needs every input in x's dtype {x.dtype}, got {wrong}"
    if s0 is not None:
        return "the chunk kernel cannot start from a state (a chunk continuing one)"
    return None


def selective_scan(x, dt, A, B, C, D, z=None, dt_bias=None, s0=None):
    """selective_scan_fn with upstream's calling convention: the raw dt in the input dtype, delta_bias in fp32
    and the softplus in the kernel, i.e. exactly the twin's ``softplus(f32(dt) + f32(dt_bias))``.
    Shapes as the twin's (B, T, E) / (B, T, N); s0 must be None (see :func:`unsupported_scan`)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if s0 is not None:
        raise ValueError("selective_scan (mamba_ssm): the CUDA kernel cannot start from a state; expected s0=None")
    t = lambda a: _aligned(a.transpose(1, 2))  # mamba_ssm layout: channels (or states) before time
    out, last = selective_scan_fn(t(x), t(dt), A.float(), t(B), t(C), D.float(), z=None if z is None else t(z),
                                  delta_bias=None if dt_bias is None else dt_bias.float().contiguous(),
                                  delta_softplus=True, return_last_state=True)
    return out.transpose(1, 2), last.float()


def selective_step(state, x, dt, A, B, C, D, z=None, dt_bias=None):
    """mamba_ssm's Triton selective_state_update, updating state (B, E, N) in place. x, dt, z (B, E) -> (B, E)."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    if dt_bias is None:
        # Upstream unpacks dt_bias's strides unconditionally (selective_state_update.py:207, "*(...) if ... else
        # 0" unpacks an int): give it zeros, which add nothing.
        dt_bias = torch.zeros(x.shape[-1], device=x.device, dtype=torch.float32)
    return selective_state_update(state, x, dt, A, B, C, D.float(), z=z, dt_bias=dt_bias.float(), dt_softplus=True)


# -------------------------------------------------------------------------------------------- attention
def unsupported_flash(q, k, v, flash, dropout_p: float = 0.0) -> str | None:
    """Why flash-attn 2 cannot take this call, or None (flash_api.cpp:373-395)."""
    if flash is None:
        return "the call's visibility is not flash-attn's causal/window (padding, or keys out of order)"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (FlashAttention takes fp16/bf16 only)"
    D = q.shape[-1]
    if D > 256 or D % 8 or k.shape[-1] != D or v.shape[-1] % D:
        return f"head dims q/k {D}/{k.shape[-1]}, v {v.shape[-1]} (needs q = k <= 256, a multiple of 8, v a multiple)"
    return None


def attend_flash(q, k, v, flash, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """flash_attn_func for one map. q (B, Hq, tq, D), k (B, Hk, tk, D), v (B, Hk, tk, Dv) -> (B, Hq, tq, Dv).

    flash-attn 2 needs the value head dim equal to q/k's (flash_api.cpp:418), so a 2D-wide value is attended as
    D-wide slices, one call each over the same keys (as the Hugging Face code does)."""
    from flash_attn import flash_attn_func

    causal, window = flash
    win = (-1, -1) if window is None else (window - 1, 0)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)  # (B, t, H, D) views: flash-attn takes strided rows
    D = k.shape[-1]
    parts = [flash_attn_func(qt, kt, v[..., i * D:(i + 1) * D].transpose(1, 2), dropout_p=dropout_p,
                             softmax_scale=scale, causal=causal, window_size=win) for i in range(v.shape[-1] // D)]
    return torch.cat(parts, dim=-1).transpose(1, 2)
