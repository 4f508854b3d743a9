"""The gating ops: silu_mul (SwiGLU, the Mamba output gate) and gmu (the GMU's fused matmul and gate).

    spec and twin   gating/ref.py (silu_mul_ref, gmu_ref: elementwise, nothing to tune)
    fast path       gating/triton_silu_mul.py, gating/triton_gmu.py (family ``gating``, CUDA; CPU only under
                    Triton's interpreter with ``backend="cuda"``)
"""

from __future__ import annotations

import torch

from sambay.kernels.common import device_of
from sambay.kernels.dispatch import use_fast
from sambay.kernels.gating.ref import gmu_ref, silu_mul_ref

__all__ = ["gmu", "gmu_ref", "silu_mul", "silu_mul_ref"]


def silu_mul(gate: torch.Tensor, value: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * value in fp32, rounded once to ``gate.dtype``. See :func:`silu_mul_ref`."""
    if use_fast("gating", backend, (gate, value)):
        from sambay.kernels.gating.triton_silu_mul import silu_mul_triton

        with device_of(gate):
            return silu_mul_triton(gate, value)
    return silu_mul_ref(gate, value)


def gmu(x: torch.Tensor, in_proj_weight: torch.Tensor, memory: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(x @ in_proj_weight^T) * memory as one fused op. See :func:`gmu_ref`."""
    if use_fast("gating", backend, (x, in_proj_weight, memory)):
        from sambay.kernels.gating.triton_gmu import gmu_triton

        with device_of(x):
            return gmu_triton(x, in_proj_weight, memory)
    from sambay.kernels.linear import linear

    return silu_mul_ref(linear(x, in_proj_weight, None, backend), memory)  # gmu_ref, its matmul through linear
