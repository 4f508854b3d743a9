"""The executable spec of every op sambay dispatches: plain PyTorch, written for reading, not for speed.

Each function upcasts to fp32 (fp64 stays fp64, for gradcheck), computes, and rounds once to the output dtype,
which is where the Hugging Face reference rounds (its jiterator SwiGLU, the fused gate of the selective scan).
The production implementations are tested against these: the CPU-tuned twins (:mod:`sambay.kernels.twins`,
the ``"torch"`` backend), the Triton kernels and the CUDA adapters (:mod:`sambay.kernels.cuda_adapters`).

Mamba-1, per channel e and state n, with delta = softplus(dt + dt_bias) (threshold 20, the kernels' rule):
    s_t = exp(delta_t A) s_{t-1} + delta_t B_t x_t ;   y_t = <s_t, C_t> + D x_t ;   out_t = y_t silu(z_t) if z
Attention map: softmax(q k^T scale) v, query head h reading kv head h // (Hq / Hk) (consecutive GQA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 for accumulation; fp64 stays fp64 (gradcheck runs the model in fp64)."""
    return x if x.dtype == torch.float64 else x.float()


# ---------------------------------------------------------------------------------------------- gating
def silu_mul_ref(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """silu(gate) * value, computed in fp32 and rounded once to ``gate.dtype``.

    Used three times in SambaY: the SwiGLU MLP (gate/value halves of fc1), the GMU (in_proj output
    gated against the memory) and the Mamba output gate (y * silu(z)).

    Args:
        gate: (..., C), any float dtype; may be a strided view (e.g. one half of fc1's output).
        value: (..., C), same shape; fp32 or gate's dtype.
    Returns:
        (..., C) in ``gate.dtype``.
    """
    if gate.shape != value.shape:
        raise ValueError(f"silu_mul: gate and value must have the same shape, got {tuple(gate.shape)} "
                         f"and {tuple(value.shape)}")
    return (F.silu(f32(gate)) * f32(value)).to(gate.dtype)


def gmu_ref(x: torch.Tensor, in_proj_weight: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """The Gated Memory Unit's gate: silu(x @ W_in^T) * memory (out_proj is applied by the caller).

    The matmul runs in the input dtype (as nn.Linear does), the gate in fp32 with one rounding.

    Args:
        x: (..., C) the normed hidden states.
        in_proj_weight: (E, C).
        memory: (..., E) the memory layer's ungated scan output for the same positions.
    Returns:
        (..., E) in ``x.dtype``.
    """
    return silu_mul_ref(F.linear(x, in_proj_weight), memory)


# ------------------------------------------------------------------------------------------------- conv
def causal_conv1d_ref(history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(depthwise causal conv) over a chunk that continues ``history``.

    Args:
        history: (B, E, K-1+T) the K-1 inputs before the chunk (zeros at the start) then the T new ones.
        weight: (E, K), tap K-1 multiplying the newest input; bias: (E,) or None.
    Returns:
        (B, E, T) in ``history.dtype``: out[:, e, t] = silu(bias[e] + sum_k weight[e, k] * history[:, e, t + k]).
    """
    K = weight.shape[1]
    T = history.shape[2] - (K - 1)
    h, w = f32(history), f32(weight)
    acc = torch.zeros(history.shape[0], history.shape[1], T, dtype=h.dtype, device=h.device)
    for k in range(K):
        acc = acc + w[:, k, None] * h[:, :, k:k + T]
    if bias is not None:
        acc = acc + f32(bias)[:, None]
    return F.silu(acc).to(history.dtype)


def causal_conv1d_step_ref(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """One decode step of the conv. conv_state: (B, E, K-1) the previous inputs, oldest first, shifted in place;
    x: (B, E) the new input; weight: (E, K). Returns silu(conv) (B, E) in ``x.dtype``."""
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=2)  # (B, E, K)
    conv_state.copy_(window[:, :, 1:])
    return causal_conv1d_ref(window, weight, bias)[..., 0].to(x.dtype)


# ------------------------------------------------------------------------------------------------- scan
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


# -------------------------------------------------------------------------------------------- attention
def attend_ref(q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
    """One attention map with an fp32 softmax.

    Args:
        q: (B, Hq, tq, D); k: (B, Hk, tk, D); v: (B, Hk, tk, Dv), Hq a multiple of Hk (consecutive GQA).
        mask: (B, 1, tq, tk) bool (True = visible) or None; causal: top-left causal when mask is None.
    Returns:
        (B, Hq, tq, Dv) in ``q.dtype``; a row that sees no key is 0.
    """
    r = q.shape[1] // k.shape[1]
    kf, vf = f32(k).repeat_interleave(r, dim=1), f32(v).repeat_interleave(r, dim=1)
    s = torch.matmul(f32(q), kf.transpose(-1, -2)) * scale  # (B, Hq, tq, tk)
    tq, tk = s.shape[-2:]
    if mask is not None:
        visible = mask
    elif causal:
        visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
    else:
        visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.matmul(p, vf).to(q.dtype)


def attend_pair_ref(q1, q2, k, v, mask, causal: bool, scale: float):
    """Both maps of differential attention: q1 (and q2) (B, Hq/2, tq, D) against stripe 0 (and 1) of
    k (B, 2, G, tk, D), each with the same 2D-wide value v (B, G, tk, Dv)."""
    return attend_ref(q1, k[:, 0], v, mask, causal, scale), attend_ref(q2, k[:, 1], v, mask, causal, scale)
