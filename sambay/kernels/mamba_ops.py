"""Mamba-1 ops with a CUDA fast path: causal_conv1d and mamba_ssm kernels (the ``cuda`` extra) behind
the signatures of the plain-PyTorch twins in :mod:`sambay.kernels.reference_scan`.

``backend="auto"`` takes the CUDA kernel when the tensors are on CUDA and the package imports, the twin
otherwise; ``"torch"`` always the twin; ``"cuda"`` insists (and says why it cannot). Decided per call.
"""

from __future__ import annotations

import functools

import torch

from sambay.kernels.reference_scan import (
    causal_conv1d_ref,
    causal_conv1d_step_ref,
    selective_scan_ref,
    selective_step_ref,
)

_BACKENDS = ("auto", "torch", "cuda")


@functools.cache
def has_causal_conv1d() -> bool:
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def has_mamba_ssm() -> bool:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: F401
    except Exception:
        return False
    return True


def _use_cuda(backend: str, available: bool, package: str, x: torch.Tensor) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and available
    if not x.is_cuda:
        raise RuntimeError(f"backend='cuda' needs CUDA tensors, got a tensor on {x.device}")
    if not available:
        raise RuntimeError(f"backend='cuda' needs the {package} package (pip install 'sambay[cuda]')")
    return True


def causal_conv1d(history, weight, bias, backend: str = "auto"):
    """silu(causal depthwise conv). See :func:`causal_conv1d_ref` (history (B, E, K-1+T) -> (B, E, T))."""
    if _use_cuda(backend, has_causal_conv1d(), "causal_conv1d", history):
        from causal_conv1d import causal_conv1d_fn

        K = weight.shape[1]
        # The kernel zero-pads K-1 steps on the left; running it over the history and dropping the first
        # K-1 outputs gives exactly the conv that continues from the history.
        return causal_conv1d_fn(history, weight, bias, activation="silu")[:, :, K - 1:]
    return causal_conv1d_ref(history, weight, bias)


def causal_conv1d_step(conv_state, x, weight, bias, backend: str = "auto"):
    """One decode step of the conv, shifting ``conv_state`` (B, E, K-1) in place. See the twin."""
    if _use_cuda(backend, has_causal_conv1d(), "causal_conv1d", x):
        from causal_conv1d import causal_conv1d_update

        return causal_conv1d_update(x, conv_state, weight, bias, activation="silu")
    return causal_conv1d_step_ref(conv_state, x, weight, bias)


def selective_scan(x, delta, A, B, C, D, z=None, s0=None, backend: str = "auto"):
    """The chunk scan. See :func:`selective_scan_ref`. The CUDA kernel cannot start from a state, so a
    chunk that continues one (s0 given) always takes the twin."""
    if s0 is None and _use_cuda(backend, has_mamba_ssm(), "mamba_ssm", x):
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        # mamba_ssm layout: channels before time, B/C as (B, N, T).
        out, last = selective_scan_fn(x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                      C.transpose(1, 2), D.float(), z=None if z is None else z.transpose(1, 2),
                                      delta_softplus=False, return_last_state=True)
        return out.transpose(1, 2), last.float()
    return selective_scan_ref(x, delta, A, B, C, D, z=z, s0=s0)


def selective_step(state, x, delta, A, B, C, D, z=None, backend: str = "auto"):
    """One recurrence step updating ``state`` in place. See :func:`selective_step_ref`."""
    if _use_cuda(backend, has_mamba_ssm(), "mamba_ssm", x):
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        return selective_state_update(state, x, delta, A, B, C, D.float(), z=z, dt_softplus=False)
    return selective_step_ref(state, x, delta, A, B, C, D, z=z)
