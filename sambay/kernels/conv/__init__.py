"""The causal depthwise conv of the Mamba layers, over a chunk (continuing a history) and one decode step.

    spec        conv/ref.py (causal_conv1d_ref, causal_conv1d_step_ref)
    twin        conv/twin.py (one grouped F.conv1d)
    fast path   conv/cuda.py (causal-conv1d, family ``conv``, CUDA)
"""

from __future__ import annotations

from sambay.kernels.conv import cuda, twin
from sambay.kernels.dispatch import use_fast

__all__ = ["causal_conv1d", "causal_conv1d_step"]


def causal_conv1d(history, weight, bias, backend: str = "auto"):
    """silu(causal depthwise conv) continuing a history: (B, E, K-1+T) -> (B, E, T). See ``causal_conv1d_ref``."""
    if use_fast("conv", backend, (history, weight), cuda.unsupported_conv(history, weight, bias)):
        return cuda.causal_conv1d(history, weight, bias)
    return twin.causal_conv1d(history, weight, bias)


def causal_conv1d_step(conv_state, x, weight, bias, backend: str = "auto"):
    """One decode step of the conv, shifting ``conv_state`` (B, E, K-1) in place; x (B, E) -> (B, E)."""
    if use_fast("conv", backend, (conv_state, x, weight), cuda.unsupported_conv(x, weight, bias)):
        return cuda.causal_conv1d_step(conv_state, x, weight, bias)
    return twin.causal_conv1d_step(conv_state, x, weight, bias)
