"""The ``"torch"`` backend: plain-PyTorch implementations tuned for the CPU, each equal to its spec in
:mod:`sambay.kernels.reference` (tested) and with the signature of the fast path it stands in for.

silu_mul and gmu need no tuning: their twins are the reference functions themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sambay.kernels.reference import f32, gmu_ref, silu_mul_ref, softplus_dt

__all__ = ["attend", "attend_pair", "causal_conv1d", "causal_conv1d_step", "gmu_ref", "linear", "selective_scan",
           "selective_step", "silu_mul_ref"]


# ----------------------------------------------------------------------------------------------- linear
def _cpu_has_half_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); read once. It decides speed, not math."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


_HALF_MATMUL = _cpu_has_half_matmul()
# Weights are upcast in blocks of at most this many elements (64 MB of fp32), whatever the matrix size.
_UPCAST_BLOCK = 1 << 24


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) in x.dtype. A bf16/fp16 weight on a CPU without native bf16 matmuls (AVX2: ATen's
    bf16 GEMM runs at ~8 GFLOP/s a core against ~50 for fp32) is upcast to fp32 a block of rows at a time and
    multiplied in fp32, the result rounded once: the same math (fp32 accumulation), 4-6x faster for prefill."""
    if _HALF_MATMUL or x.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return F.linear(x, weight, bias)
    N, K = weight.shape
    rows = max(1, _UPCAST_BLOCK // max(1, K))
    xf = x.float()
    parts = [F.linear(xf, weight[n0:n0 + rows].float()) for n0 in range(0, N, rows)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------- conv
def causal_conv1d(history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(depthwise causal conv) as one grouped F.conv1d. history (B, E, K-1+T) -> (B, E, T)."""
    b = None if bias is None else f32(bias)
    return F.silu(F.conv1d(f32(history), f32(weight)[:, None, :], b, groups=weight.shape[0])).to(history.dtype)


def causal_conv1d_step(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """One decode step (conv_state (B, E, K-1) shifted in place, x (B, E)) as one multiply-sum."""
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=2)  # (B, E, K)
    conv_state.copy_(window[:, :, 1:])
    out = (f32(window) * f32(weight)).sum(-1)
    if bias is not None:
        out = out + f32(bias)
    return F.silu(out).to(x.dtype)


# ------------------------------------------------------------------------------------------------- scan
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


# -------------------------------------------------------------------------------------------- attention
# Decode-sized calls (few query rows) on the CPU: SDPA's CPU kernels parallelise over query blocks and copy
# strided K/V, and are 20-100x slower than two matmuls here; the scores of so few rows are small.
_MATMUL_ROWS = 16


def attend(q, k, v, mask, causal: bool, scale: float, dropout_p: float = 0.0, flash=None) -> torch.Tensor:
    """One attention map. Args as ``attend_ref``; ``flash`` (the plan's flash-attn description) is unused here.

    CPU decode-sized calls: two matmuls with an fp32 softmax. Otherwise SDPA with the boolean mask.
    """
    if not q.is_cuda and q.shape[2] <= _MATMUL_ROWS and dropout_p == 0.0:
        return _attend_matmul(q, k, v, mask, causal, scale)
    if v.shape[-1] > q.shape[-1]:
        # SDPA's fast kernels need equal q/k/v widths; with a 2D-wide value it falls back to a kernel that
        # materialises every score (7x slower at 8K tokens on CPU). Zero columns in q and k change no score.
        pad = v.shape[-1] - q.shape[-1]
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                          scale=scale, enable_gqa=True)


def _probs(q, k, mask, causal: bool, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) for GQA heads grouped per kv head: (B, G, r * tq, tk), fp32 or fp64."""
    B, H, tq, D = q.shape
    G, tk = k.shape[1], k.shape[2]
    r = H // G  # query heads per kv head (consecutive)
    if q.dtype in (torch.float16, torch.bfloat16):  # keep the scores in fp32, as fused kernels do
        q, k = q.float(), k.float()
    s = torch.matmul(q.reshape(B, G, r * tq, D), k.transpose(-1, -2)).view(B, G, r, tq, tk) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, :, None], float("-inf"))  # (B, 1, 1, tq, tk)
    elif causal:
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1).view(B, G, r * tq, tk)


def _attend_matmul(q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
    """attend as two matmuls with an fp32 softmax. Same shapes and semantics."""
    B, H, tq, _ = q.shape
    p = _probs(q, k, mask, causal, scale)
    return torch.matmul(p, v.to(p.dtype)).view(B, H, tq, v.shape[-1]).to(q.dtype)


def _attend_pair_matmul(q1, q2, k, v, mask, causal: bool, scale: float):
    """attend_pair with one read of V: both maps' probabilities stacked, then a single matmul."""
    B, H, tq, _ = q1.shape
    p = torch.cat([_probs(q1, k[:, 0], mask, causal, scale), _probs(q2, k[:, 1], mask, causal, scale)], dim=2)
    o = torch.matmul(p, v.to(p.dtype)).to(q1.dtype)  # (B, G, 2 * r * tq, Dv)
    half = p.shape[2] // 2
    return o[:, :, :half].reshape(B, H, tq, -1), o[:, :, half:].reshape(B, H, tq, -1)


def attend_pair(q1, q2, k, v, mask, causal: bool, scale: float, dropout_p: float = 0.0, flash=None):
    """Both maps of differential attention: (attend(q1, k[:, 0], v), attend(q2, k[:, 1], v)).

    Args: q1, q2 (B, Hq/2, tq, D); k (B, 2, G, tk, D) the two key stripes; v (B, G, tk, Dv).
    Decode-sized CPU calls compute both probability maps first and multiply them with V in one matmul,
    so each step reads K and V once (two separate calls would read V twice).
    """
    if not q1.is_cuda and q1.shape[2] <= _MATMUL_ROWS and dropout_p == 0.0:
        return _attend_pair_matmul(q1, q2, k, v, mask, causal, scale)
    return (attend(q1, k[:, 0], v, mask, causal, scale, dropout_p),
            attend(q2, k[:, 1], v, mask, causal, scale, dropout_p))
