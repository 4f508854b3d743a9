"""The spec of the gating ops, which is also their ``"torch"`` twin (elementwise: nothing to tune).

Computed in fp32 (fp64 stays fp64, for gradcheck) and rounded once to the output dtype, which is where the
Hugging Face reference rounds (its jiterator SwiGLU, the fused gate of the selective scan).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sambay.kernels.common import f32


def silu_mul_ref(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """silu(gate) * value, computed in fp32 and rounded once to ``gate.dtype``.

    Used three times in SambaY: the SwiGLU MLP (gate/value halves of fc1), the GMU (in_proj output
    gated against the memory) and the Mamba output gate (y * silu(z)).

    Args:
        gate: (..., C), any float dtype; may be a strided view (e.g. one half of fc1's output).
        value: (..., C), same shape; fp32 or gate's dtype.
    Returns:
        (..., C) in ``gate.dtype``.
    """
    if gate.shape != value.shape:
        raise ValueError(f"silu_mul: gate and value must have the same shape, got {tuple(gate.shape)} "
                         f"and {tuple(value.shape)}")
    return (F.silu(f32(gate)) * f32(value)).to(gate.dtype)


def gmu_ref(x: torch.Tensor, in_proj_weight: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """The Gated Memory Unit's gate: silu(x @ W_in^T) * memory (out_proj is applied by the caller).

    The matmul runs in the input dtype (as nn.Linear does), the gate in fp32 with one rounding.

    Args:
        x: (..., C) the normed hidden states.
        in_proj_weight: (E, C).
        memory: (..., E) the memory layer's ungated scan output for the same positions.
    Returns:
        (..., E) in ``x.dtype``.
    """
    return silu_mul_ref(F.linear(x, in_proj_weight), memory)
