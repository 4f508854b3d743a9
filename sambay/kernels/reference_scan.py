"""Plain-PyTorch Mamba-1 ops: the spec for causal_conv1d's ``causal_conv1d_fn``/``causal_conv1d_update``
and mamba_ssm's ``selective_scan_fn``/``selective_state_update``. Arithmetic in fp32 (fp64 stays fp64).

Per channel e and state n:  s_t = exp(delta_t * A) * s_{t-1} + delta_t * B_t * x_t ;
                            y_t = <s_t, C_t> + D * x_t ;   out_t = y_t * silu(z_t) if z is given
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sambay.kernels.reference import f32

# The recurrence runs in blocks of this many steps: the per-step work is one fused multiply-add on
# (B, E, N), while exp(delta*A) and delta*B*x for a block are computed in bulk. It bounds the
# temporary memory to (B, block, E, N) whatever T is.
_BLOCK = 64


def causal_conv1d_ref(history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(depthwise causal conv), fp32 inside, rounded once.

    Args:
        history: (B, E, K-1+T) the K-1 inputs before the chunk (zeros at the start) then the T new ones.
        weight: (E, K); bias: (E,) or None.
    Returns:
        (B, E, T) in ``history.dtype``.
    """
    b = None if bias is None else f32(bias)
    return F.silu(F.conv1d(f32(history), f32(weight)[:, None, :], b, groups=weight.shape[0])).to(history.dtype)


def causal_conv1d_step_ref(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """One decode step of the conv. conv_state: (B, E, K-1) the previous inputs, shifted in place;
    x: (B, E) the new input; weight: (E, K). Returns silu(conv) (B, E) in ``x.dtype``."""
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=2)  # (B, E, K)
    conv_state.copy_(window[:, :, 1:])
    out = (f32(window) * f32(weight)).sum(-1)
    if bias is not None:
        out = out + f32(bias)
    return F.silu(out).to(x.dtype)


def selective_scan_ref(x, delta, A, B, C, D, z=None, s0=None):
    """Args:
        x: (B, T, E) scan input (the conv output), any float dtype.
        delta: (B, T, E), already softplus'd (bias included), fp32.
        A: (E, N) fp32 (negative).  B, C: (B, T, N).  D: (E,) skip.
        z: (B, T, E) gate or None.  s0: (B, E, N) initial state or None (zeros).
    Returns:
        out: (B, T, E) in ``x.dtype``: y * silu(z) (one rounding) when z is given, else y.
        s_T: (B, E, N) final state, fp32.
    """
    bsz, T, E = x.shape
    N = A.shape[1]
    xf, Bf, Cf = f32(x), f32(B), f32(C)
    s = torch.zeros(bsz, E, N, device=x.device, dtype=xf.dtype) if s0 is None else f32(s0)
    # Without autograd the states are written in place (no stacking pass); with it, kept as a list.
    in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, delta, A, B, C, s)))
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


def selective_step_ref(state, x, delta, A, B, C, D, z=None):
    """One recurrence step, updating ``state`` in place.

    Args:
        state: (B, E, N) fp32, updated in place.
        x: (B, E); delta: (B, E) softplus'd; A: (E, N); B, C: (B, N); D: (E,); z: (B, E) or None.
    Returns:
        (B, E) in ``x.dtype``: y * silu(z) when z is given, else y.
    """
    d = f32(delta)[..., None]  # (B, E, 1)
    new = torch.exp(d * A) * f32(state) + d * f32(B)[:, None, :] * f32(x)[..., None]
    state.copy_(new)
    y = torch.einsum("ben,bn->be", new, f32(C)) + f32(x) * f32(D)
    if z is not None:
        y = y * F.silu(f32(z))
    return y.to(x.dtype)
