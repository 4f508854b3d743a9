"""The conv's ``"torch"`` twin: one grouped F.conv1d, equal to :mod:`sambay.kernels.conv.ref` (tested)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sambay.kernels.common import f32


def causal_conv1d(history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(depthwise causal conv) as one grouped F.conv1d. history (B, E, K-1+T) -> (B, E, T)."""
    b = None if bias is None else f32(bias)
    return F.silu(F.conv1d(f32(history), f32(weight)[:, None, :], b, groups=weight.shape[0])).to(history.dtype)


def causal_conv1d_step(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """One decode step (conv_state (B, E, K-1) shifted in place, x (B, E)) as one multiply-sum."""
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=2)  # (B, E, K)
    conv_state.copy_(window[:, :, 1:])
    out = (f32(window) * f32(weight)).sum(-1)
    if bias is not None:
        out = out + f32(bias)
    return F.silu(out).to(x.dtype)
