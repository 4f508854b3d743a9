"""The spec of attention: one map with an fp32 softmax, and the pair of maps of differential attention.

Query head h reads kv head h // (Hq / Hk) (consecutive GQA). Computed in fp32 (fp64 stays fp64) and rounded once.
"""

from __future__ import annotations

import torch

from sambay.kernels.common import f32


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
