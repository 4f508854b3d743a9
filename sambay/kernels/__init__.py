"""sambay's ops, one folder per op family, one backend vocabulary for all of them.

Each folder holds the op (its ``__init__``: the public functions and their one dispatch), the spec
(``ref.py``), the CPU-tuned ``"torch"`` twin where the spec is too slow (``twin.py``) and the fast paths
(``cuda.py`` adapters to CUDA packages, ``triton_*.py`` kernels, ``cpu_*.cpp`` C++ kernels):

    gating/       silu_mul, gmu                          Triton
    conv/         causal_conv1d, causal_conv1d_step      causal-conv1d
    scan/         selective_scan, selective_step         mamba-ssm
    attention/    attend, attend_pair, diff_attend       flash-attn (and diff_decode for decode rows)
    diff_decode/  diff_decode                            Triton (CUDA), C++ (CPU)
    linear/       linear, linear_int8, linear_int4       C++ (CPU)

- :mod:`~sambay.kernels.dispatch`: which one runs (``BACKENDS``, per call, from the tensors' device).
- :mod:`~sambay.kernels.cpu_native`: the build of the C++ kernels (``cpu/simd.h`` shared).

Importing this package imports neither triton nor any CUDA package.
"""

from __future__ import annotations

from sambay.kernels.attention import attend, attend_pair, diff_attend
from sambay.kernels.conv import causal_conv1d, causal_conv1d_step
from sambay.kernels.dispatch import BACKENDS, active_backends, triton_interpreter
from sambay.kernels.gating import gmu, gmu_ref, silu_mul, silu_mul_ref
from sambay.kernels.scan import selective_scan, selective_step

__all__ = ["BACKENDS", "active_backends", "attend", "attend_pair", "causal_conv1d", "causal_conv1d_step", "diff_attend",
           "gmu", "gmu_ref", "has_triton", "selective_scan", "selective_step", "silu_mul", "silu_mul_ref",
           "triton_interpreter"]


def has_triton() -> bool:
    """Whether ``import triton`` works (a capability check for benchmarks; the dispatcher uses its own probe)."""
    from sambay.kernels.dispatch import probe

    return probe("gating") is None
