"""The scan's ``"torch"`` twin: blocked and in place, tuned for the CPU, equal to :mod:`sambay.kernels.scan.ref`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sambay.kernels.common import f32
from sambay.kernels.scan.ref import softplus_dt

# The recurrence runs in blocks of this many steps: the per-step work is one fused multiply-add on
# (B, E, N), while exp(delta*A) and delta*B*x for a block are computed in bulk. It bounds the
# temporary memory to (B, block, E, N) whatever T is.
_BLOCK = 64


def selective_scan(x, dt, A, B, C, D, z=None, dt_bias=None, s0=None):
    """The chunk scan in blocks, states written in place. Shapes and results as ``selective_scan_ref``."""
    bsz, T, E = x.shape
    N = A.shape[1]
    delta = softplus_dt(dt, dt_bias)
    xf, Bf, Cf = f32(x), f32(B), f32(C)
    s = torch.zeros(bsz, E, N, device=x.device, dtype=xf.dtype) if s0 is None else f32(s0)
    # Without autograd the states are written in place (no stacking pass); with it, kept as a list. Under
    # torch.compile too: dynamo cannot trace ``out=`` into the strided per-step views (a graph break).
    in_place = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, s)))
    ys = []
    for t0 in range(0, T, _BLOCK):
        t1 = min(T, t0 + _BLOCK)
        d = delta[:, t0:t1, :, None]  # (B, b, E, 1)
        decay = (d * A).exp_()  # (B, b, E, N)
        drive = (d * xf[:, t0:t1, :, None]) * Bf[:, t0:t1, None, :]  # (B, b, E, N): one full-size pass
        # unbind once per block: per-step indexing costs as much as the step's arithmetic at these sizes
        steps = zip(drive.unbind(1), decay.unbind(1))
        if in_place:
            states = torch.empty_like(decay)
            for (dr, de), out in zip(steps, states.unbind(1)):
                s = torch.addcmul(dr, de, s, out=out)
        else:
            states = []
            for dr, de in steps:
                s = torch.addcmul(dr, de, s)
                states.append(s)
            states = torch.stack(states, 1)
        ys.append(torch.einsum("bten,btn->bte", states, Cf[:, t0:t1]))
    s = s.clone() if in_place else s  # detach the final state from the block buffer
    y = (torch.cat(ys, dim=1) if ys else xf.new_zeros(bsz, 0, E)) + xf * f32(D)
    if z is not None:
        y = y * F.silu(f32(z))
    return y.to(x.dtype), s


def selective_step(state, x, dt, A, B, C, D, z=None, dt_bias=None):
    """One recurrence step updating ``state`` (B, E, N) in place. As ``selective_step_ref``."""
    d = softplus_dt(dt, dt_bias)[..., None]  # (B, E, 1)
    new = torch.exp(d * A) * f32(state) + d * f32(B)[:, None, :] * f32(x)[..., None]
    state.copy_(new)
    y = torch.einsum("ben,bn->be", new, f32(C)) + f32(x) * f32(D)
    if z is not None:
        y = y * F.silu(f32(z))
    return y.to(x.dtype)
