"""The spec of the Mamba-1 selective scan, one step at a time (fp32; fp64 stays fp64).

Per channel e and state n, with delta = softplus(dt + dt_bias) (threshold 20, the kernels' rule):
    s_t = exp(delta_t A) s_{t-1} + delta_t B_t x_t ;   y_t = <s_t, C_t> + D x_t ;   out_t = y_t silu(z_t) if z
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sambay.kernels.common import f32


def softplus_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None) -> torch.Tensor:
    """delta = softplus(dt + dt_bias) in fp32 (threshold 20: identity above it, as the CUDA scan does)."""
    d = f32(dt)
    if dt_bias is not None:
        d = d + f32(dt_bias)
    return F.softplus(d)


def selective_scan_ref(x, dt, A, B, C, D, z=None, dt_bias=None, s0=None):
    """The chunk scan, one step at a time.

    Args:
        x: (B, T, E) scan input (the conv output), any float dtype.
        dt: (B, T, E) the raw time step (dt_proj without its bias); dt_bias: (E,) or None.
        A: (E, N) fp32 (negative).  B, C: (B, T, N).  D: (E,) skip.
        z: (B, T, E) gate or None.  s0: (B, E, N) initial state or None (zeros).
    Returns:
        out: (B, T, E) in ``x.dtype``: y * silu(z) (one rounding) when z is given, else y.
        s_T: (B, E, N) final state, fp32 (fp64 for fp64 inputs).
    """
    bsz, T, E = x.shape
    delta = softplus_dt(dt, dt_bias)
    s = torch.zeros(bsz, E, A.shape[1], dtype=f32(x).dtype, device=x.device) if s0 is None else f32(s0)
    ys = []
    for t in range(T):
        y, s = _recurrence(s, f32(x[:, t]), delta[:, t], A, f32(B[:, t]), f32(C[:, t]), D)
        ys.append(y)
    y = torch.stack(ys, 1) if ys else f32(x).new_zeros(bsz, 0, E)
    if z is not None:
        y = y * F.silu(f32(z))
    return y.to(x.dtype), s


def selective_step_ref(state, x, dt, A, B, C, D, z=None, dt_bias=None):
    """One recurrence step, updating ``state`` in place.

    Args:
        state: (B, E, N) fp32, updated in place.
        x: (B, E); dt: (B, E) raw; dt_bias: (E,) or None; A: (E, N); B, C: (B, N); D: (E,); z: (B, E) or None.
    Returns:
        (B, E) in ``x.dtype``: y * silu(z) when z is given, else y.
    """
    y, new = _recurrence(f32(state), f32(x), softplus_dt(dt, dt_bias), A, f32(B), f32(C), D)
    state.copy_(new)
    if z is not None:
        y = y * F.silu(f32(z))
    return y.to(x.dtype)


def _recurrence(s, x, delta, A, B, C, D):
    """s (B, E, N), x/delta (B, E), B/C (B, N) -> (y (B, E), new s)."""
    d = delta[..., None]  # (B, E, 1)
    s = torch.exp(d * A) * s + d * B[:, None, :] * x[..., None]
    return (s * C[:, None, :]).sum(-1) + x * f32(D), s
