"""Plain-PyTorch selective scan (Mamba-1), the spec for mamba_ssm's ``selective_scan_fn`` and
``selective_state_update``. All state arithmetic is fp32.

Per channel e and state n:  s_t = exp(delta_t * A) * s_{t-1} + delta_t * B_t * x_t ;
                            y_t = <s_t, C_t> + D * x_t
"""

from __future__ import annotations

import torch

from sambay.kernels.reference import f32

# The recurrence runs in blocks of this many steps: the per-step work is two fused elementwise ops
# on (B, E, N), while exp(delta*A) and delta*B*x for a block are computed in bulk. It bounds the
# temporary memory to (B, block, E, N) whatever T is.
_BLOCK = 64


def selective_scan_ref(x, delta, A, B, C, D, s0=None):
    """Args:
        x: (B, T, E) scan input (the conv output), any float dtype.
        delta: (B, T, E) fp32, already softplus'd (bias included).
        A: (E, N) fp32 (negative).
        B, C: (B, T, N).
        D: (E,) skip.
        s0: (B, E, N) initial state or None (zeros).
    Returns:
        y: (B, T, E) fp32, ungated; s_T: (B, E, N) fp32 final state.
    """
    bsz, T, E = x.shape
    N = A.shape[1]
    xf, Bf, Cf = f32(x), f32(B), f32(C)
    s = torch.zeros(bsz, E, N, device=x.device, dtype=xf.dtype) if s0 is None else f32(s0)
    ys = []
    for t0 in range(0, T, _BLOCK):
        t1 = min(T, t0 + _BLOCK)
        d = delta[:, t0:t1, :, None]  # (B, b, E, 1)
        decay = torch.exp(d * A)  # (B, b, E, N)
        drive = d * Bf[:, t0:t1, None, :] * xf[:, t0:t1, :, None]  # (B, b, E, N)
        states = torch.empty_like(decay)
        for t in range(t1 - t0):
            s = torch.addcmul(drive[:, t], decay[:, t], s)
            states[:, t] = s
        ys.append(torch.einsum("bten,btn->bte", states, Cf[:, t0:t1]))
    y = torch.cat(ys, dim=1) if ys else xf.new_zeros(bsz, 0, E)
    return y + xf * f32(D), s


def selective_step_ref(state, x, delta, A, B, C, D):
    """One recurrence step, updating ``state`` in place.

    Args:
        state: (B, E, N) fp32, updated in place.
        x: (B, E); delta: (B, E) fp32 softplus'd; A: (E, N); B, C: (B, N); D: (E,).
    Returns:
        y: (B, E) fp32, ungated.
    """
    d = delta[..., None]  # (B, E, 1)
    new = torch.exp(d * A) * state + d * f32(B)[:, None, :] * f32(x)[..., None]
    state.copy_(new)
    return torch.einsum("ben,bn->be", new, f32(C)) + f32(x) * f32(D)
