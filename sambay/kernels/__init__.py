"""sambay's ops, one backend vocabulary for all of them.

- :mod:`~sambay.kernels.reference`: the executable spec of every op (plain loops, fp32, one rounding).
- :mod:`~sambay.kernels.twins`: the ``"torch"`` backend, CPU-tuned PyTorch equal to the spec.
- :mod:`~sambay.kernels.triton_silu_mul`, :mod:`~sambay.kernels.triton_gmu`: sambay's Triton kernels.
- :mod:`~sambay.kernels.cuda_adapters`: every call into causal-conv1d, mamba-ssm and flash-attn.
- :mod:`~sambay.kernels.dispatch`: which one runs (``BACKENDS``, per call, from the tensors' device).
- :mod:`~sambay.kernels.ops`: the public ops below.

Importing this package imports neither triton nor any CUDA package.
"""

from __future__ import annotations

from sambay.kernels.dispatch import BACKENDS, active_backends, triton_interpreter
from sambay.kernels.ops import (
    attend,
    attend_pair,
    causal_conv1d,
    causal_conv1d_step,
    diff_attend,
    gmu,
    selective_scan,
    selective_step,
    silu_mul,
)
from sambay.kernels.reference import gmu_ref, silu_mul_ref

__all__ = ["BACKENDS", "active_backends", "attend", "attend_pair", "causal_conv1d", "causal_conv1d_step", "diff_attend",
           "gmu", "gmu_ref", "has_triton", "selective_scan", "selective_step", "silu_mul", "silu_mul_ref",
           "triton_interpreter"]


def has_triton() -> bool:
    """Whether ``import triton`` works (a capability check for benchmarks; the dispatcher uses its own probe)."""
    from sambay.kernels.dispatch import probe

    return probe("gating") is None
