"""Attention through flash-attn 2 (``flash_attn_func``), behind the twin's signature.

:func:`unsupported_flash` says when a call cannot be met (the dispatcher then takes the twin, or raises for
``backend="cuda"``). Checked on CPU against the real package by tests/kernels/test_upstream_contracts.py, which
cites the upstream lines. Imports happen inside the adapter, never at module import.
"""

from __future__ import annotations

import torch


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
