"""The spec of the causal depthwise conv of the Mamba layers: plain loops, fp32, one rounding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sambay.kernels.common import f32


def causal_conv1d_ref(history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(depthwise causal conv) over a chunk that continues ``history``.

    Args:
        history: (B, E, K-1+T) the K-1 inputs before the chunk (zeros at the start) then the T new ones.
        weight: (E, K), tap K-1 multiplying the newest input; bias: (E,) or None.
    Returns:
        (B, E, T) in ``history.dtype``: out[:, e, t] = silu(bias[e] + sum_k weight[e, k] * history[:, e, t + k]).
    """
    K = weight.shape[1]
    T = history.shape[2] - (K - 1)
    h, w = f32(history), f32(weight)
    acc = torch.zeros(history.shape[0], history.shape[1], T, dtype=h.dtype, device=h.device)
    for k in range(K):
        acc = acc + w[:, k, None] * h[:, :, k:k + T]
    if bias is not None:
        acc = acc + f32(bias)[:, None]
    return F.silu(acc).to(history.dtype)


def causal_conv1d_step_ref(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """One decode step of the conv. conv_state: (B, E, K-1) the previous inputs, oldest first, shifted in place;
    x: (B, E) the new input; weight: (E, K). Returns silu(conv) (B, E) in ``x.dtype``."""
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=2)  # (B, E, K)
    conv_state.copy_(window[:, :, 1:])
    return causal_conv1d_ref(window, weight, bias)[..., 0].to(x.dtype)
