"""The conv through causal-conv1d (``causal_conv1d_fn``/``causal_conv1d_update``), behind the twin's signature.

The contract is checked on CPU against the real package by tests/kernels/test_upstream_contracts.py, which cites
the upstream lines. Imports happen inside the adapters, never at module import.
"""

from __future__ import annotations

import torch

from sambay.kernels.common import aligned

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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
    # reads aligned rows (see common.aligned).
    out = causal_conv1d_fn(aligned(history), weight.contiguous(), bias, activation="silu")
    return out[:, :, K - 1:].contiguous()


def causal_conv1d_step(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """causal_conv1d_update: one step, shifting conv_state (B, E, K-1) in place. x (B, E) -> (B, E)."""
    from causal_conv1d import causal_conv1d_update

    out = causal_conv1d_update(x.to(conv_state.dtype), conv_state, weight.contiguous(), bias, activation="silu")
    return out.to(x.dtype)
