"""Public fused ops. Each has a plain-PyTorch twin in :mod:`sambay.kernels.reference` with the same
signature; ``backend="auto"`` picks Triton for CUDA tensors when Triton imports, else the twin.
The choice is made per call from the tensors' device, never from a global or an env variable.
"""

from __future__ import annotations

import functools
import os

import torch

from sambay.kernels.reference import gmu_ref, silu_mul_ref

__all__ = ["gmu", "gmu_ref", "has_triton", "silu_mul", "silu_mul_ref", "triton_interpreter"]

_BACKENDS = ("auto", "torch", "triton")


@functools.cache
def has_triton() -> bool:
    """Whether ``import triton`` works (a capability check, cached; it changes no math)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreter() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` set before import).

    This only decides whether CPU tensors *may* be sent to a Triton kernel when the caller asks for
    ``backend="triton"`` explicitly (tests do); it never changes what ``"auto"`` picks.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and has_triton()
    # backend == "triton": the caller insists; say exactly why it cannot run.
    if not has_triton():
        raise RuntimeError("backend='triton' was requested but triton is not importable; "
                           "install the 'triton' extra or use backend='torch'")
    if not on_cuda and not triton_interpreter():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton "
                           f"is imported), got tensors on {devices}")
    return True


def silu_mul(gate: torch.Tensor, value: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * value in fp32, rounded once to ``gate.dtype``. See :func:`silu_mul_ref`."""
    if _use_triton(backend, gate, value):
        from sambay.kernels.gating import silu_mul_triton

        return silu_mul_triton(gate, value)
    return silu_mul_ref(gate, value)


def gmu(x: torch.Tensor, in_proj_weight: torch.Tensor, memory: torch.Tensor,
        backend: str = "auto") -> torch.Tensor:
    """silu(x @ in_proj_weight^T) * memory as one fused op. See :func:`gmu_ref`."""
    if _use_triton(backend, x, in_proj_weight, memory):
        # The kernels live in gmu_matmul.py, not gmu.py: importing a submodule named ``gmu`` would make
        # Python rebind this package's ``gmu`` attribute (this function) to that module.
        from sambay.kernels.gmu_matmul import gmu_triton

        return gmu_triton(x, in_proj_weight, memory)
    return gmu_ref(x, in_proj_weight, memory)
