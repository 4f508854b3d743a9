"""The Mamba-1 selective scan: over a chunk, and one recurrence step.

    spec        scan/ref.py (selective_scan_ref, selective_step_ref)
    twin        scan/twin.py (blocked, states written in place)
    fast path   scan/cuda.py (mamba-ssm's CUDA chunk scan and Triton decode step, family ``scan``, CUDA)
"""

from __future__ import annotations

from sambay.kernels.dispatch import use_fast
from sambay.kernels.scan import cuda, twin

__all__ = ["selective_scan", "selective_step"]


def selective_scan(x, dt, A, B, C, D, z=None, dt_bias=None, s0=None, backend: str = "auto"):
    """The chunk scan with delta = softplus(dt + dt_bias). See ``selective_scan_ref`` for shapes.
    A chunk that continues a state (s0 given) cannot use the CUDA kernel: "auto" takes the twin."""
    if use_fast("scan", backend, (x, dt, B, C), cuda.unsupported_scan(x, dt, B, C, z, s0)):
        return cuda.selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias)
    return twin.selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, s0=s0)


def selective_step(state, x, dt, A, B, C, D, z=None, dt_bias=None, backend: str = "auto"):
    """One recurrence step updating ``state`` (B, E, N) in place. See ``selective_step_ref``."""
    if use_fast("scan", backend, (state, x, dt, B, C)):
        return cuda.selective_step(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias)
    return twin.selective_step(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias)
