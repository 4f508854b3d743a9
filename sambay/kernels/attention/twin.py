"""Attention's ``"torch"`` twin, tuned for the CPU (matmul decode rows, padded SDPA), equal to
:mod:`sambay.kernels.attention.ref` (tested)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
