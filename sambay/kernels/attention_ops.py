"""One differential-attention map, softmax(q k^T * scale) [v_a | v_b], with a flash-attn fast path.

The twin is PyTorch's SDPA with the plan's boolean mask (any device, any dtype). flash_attn (the
``cuda`` extra) is used for bf16/fp16 CUDA tensors when the call's visibility is expressible as
flash-attn's causal/window flags, i.e. the plan marked it ``flash`` (no padding, keys in position
order). flash-attn 2 needs equal q/k/v head dims, so the 2D-wide value is attended as two D-wide halves
(two kernel calls over the same keys, as the Hugging Face code does).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "torch", "cuda")


@functools.cache
def has_flash_attn() -> bool:
    try:
        from flash_attn import flash_attn_func  # noqa: F401
    except Exception:
        return False
    return True


def attend_ref(q, k, v, mask, causal: bool, scale: float, dropout_p: float = 0.0, flash=None) -> torch.Tensor:
    """Args:
        q: (B, Hq, tq, D); k: (B, Hk, tk, D); v: (B, Hk, tk, Dv) with Hq a multiple of Hk (consecutive GQA).
        mask: (B, 1, tq, tk) bool (True = visible) or None; causal: top-left causal when mask is None.
        flash: the plan's (causal, window) description, unused here (same signature as the fast path).
    Returns:
        (B, Hq, tq, Dv)
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


# Decode-sized calls (few query rows) on the CPU: SDPA's CPU kernels parallelise over query blocks and copy
# strided K/V, and are 20-100x slower than two matmuls here; the scores of so few rows are small.
_MATMUL_ROWS = 16


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
    """attend_ref as two matmuls with an fp32 softmax. Same shapes and semantics."""
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


def attend_pair(q1, q2, k, v, mask, causal: bool, scale: float, dropout_p: float = 0.0, flash=None,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps of differential attention: (attend(q1, k[:, 0], v), attend(q2, k[:, 1], v)).

    Args: q1, q2 (B, Hq/2, tq, D); k (B, 2, G, tk, D) the two key stripes; v (B, G, tk, Dv).
    Decode-sized CPU calls compute both probability maps first and multiply them with V in one matmul,
    so each step reads K and V once (two separate calls would read V twice).
    """
    if backend != "cuda" and not q1.is_cuda and q1.shape[2] <= _MATMUL_ROWS and dropout_p == 0.0:
        return _attend_pair_matmul(q1, q2, k, v, mask, causal, scale)
    return tuple(attend(q, k[:, s], v, mask, causal, scale, dropout_p, flash, backend)
                 for s, q in ((0, q1), (1, q2)))


def _attend_flash(q, k, v, flash, scale: float, dropout_p: float) -> torch.Tensor:
    from flash_attn import flash_attn_func

    causal, window = flash
    win = (-1, -1) if window is None else (window - 1, 0)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)  # (B, t, H, D) views: flash-attn takes strided rows
    D = k.shape[-1]
    halves = [flash_attn_func(qt, kt, v[..., i * D:(i + 1) * D].transpose(1, 2), dropout_p=dropout_p,
                              softmax_scale=scale, causal=causal, window_size=win) for i in range(v.shape[-1] // D)]
    return torch.cat(halves, dim=-1).transpose(1, 2)  # (B, Hq, tq, Dv)


def attend(q, k, v, mask, causal: bool, scale: float, dropout_p: float = 0.0, flash=None,
           backend: str = "auto") -> torch.Tensor:
    """See :func:`attend_ref`. ``flash`` is (causal, window) when the call's visibility is exactly
    flash-attn's bottom-right causal (+ window of ``window`` keys) with no padding, else None."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash is not None
    if backend == "cuda":
        if not (usable and has_flash_attn()):
            raise RuntimeError(f"backend='cuda' needs flash_attn installed, bf16/fp16 CUDA tensors and a call "
                               f"without padding; got device={q.device}, dtype={q.dtype}, flash={flash}, "
                               f"flash_attn installed={has_flash_attn()}")
        return _attend_flash(q, k, v, flash, scale, dropout_p)
    if backend == "auto" and usable and has_flash_attn():
        return _attend_flash(q, k, v, flash, scale, dropout_p)
    return attend_ref(q, k, v, mask, causal, scale, dropout_p)
