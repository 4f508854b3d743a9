"""The scan through mamba-ssm (``selective_scan_fn`` and its Triton ``selective_state_update``), behind the twin's
signature: channels-before-time layouts, 16-byte aligned rows for the vectorized loads, the input dtype for
delta/B/C/z, fp32 A/D/delta_bias, a dt_bias tensor for the decode step. Checked on CPU against the real package by
tests/kernels/test_upstream_contracts.py. Imports happen inside the adapters, never at module import.
"""

from __future__ import annotations

import torch

from sambay.kernels.common import aligned

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

def unsupported_scan(x, dt, B, C, z, s0=None) -> str | None:
    """Why mamba_ssm cannot take this call, or None (selective_scan.cpp:235-303)."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"input dtype {x.dtype} (the kernel takes fp32/fp16/bf16)"
    others = {"dt": dt, "B": B, "C": C} | ({"z": z} if z is not None else {})
    wrong = {name: t.dtype for name, t in others.items() if t.dtype != x.dtype}
    if wrong:
        return f"the kernel needs every input in x's dtype {x.dtype}, got {wrong}"
    if s0 is not None:
        return "the chunk kernel cannot start from a state (a chunk continuing one)"
    return None


def selective_scan(x, dt, A, B, C, D, z=None, dt_bias=None, s0=None):
    """selective_scan_fn with upstream's calling convention: the raw dt in the input dtype, delta_bias in fp32
    and the softplus in the kernel, i.e. exactly the twin's ``softplus(f32(dt) + f32(dt_bias))``.
    Shapes as the twin's (B, T, E) / (B, T, N); s0 must be None (see :func:`unsupported_scan`)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if s0 is not None:
        raise ValueError("selective_scan (mamba_ssm): the CUDA kernel cannot start from a state; expected s0=None")
    t = lambda a: aligned(a.transpose(1, 2))  # mamba_ssm layout: channels (or states) before time
    out, last = selective_scan_fn(t(x), t(dt), A.float(), t(B), t(C), D.float(), z=None if z is None else t(z),
                                  delta_bias=None if dt_bias is None else dt_bias.float().contiguous(),
                                  delta_softplus=True, return_last_state=True)
    return out.transpose(1, 2), last.float()


def selective_step(state, x, dt, A, B, C, D, z=None, dt_bias=None):
    """mamba_ssm's Triton selective_state_update, updating state (B, E, N) in place. x, dt, z (B, E) -> (B, E)."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    if dt_bias is None:
        # Upstream unpacks dt_bias's strides unconditionally (selective_state_update.py:207, "*(...) if ... else
        # 0" unpacks an int): give it zeros, which add nothing.
        dt_bias = torch.zeros(x.shape[-1], device=x.device, dtype=torch.float32)
    return selective_state_update(state, x, dt, A, B, C, D.float(), z=z, dt_bias=dt_bias.float(), dt_softplus=True)
