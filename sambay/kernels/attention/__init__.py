"""Attention: one map (``attend``), the two maps of differential attention (``attend_pair``), and their
difference (``diff_attend``), whose decode rows go to the differential decode op (:mod:`sambay.kernels.diff_decode`).

    spec        attention/ref.py (attend_ref, attend_pair_ref)
    twin        attention/twin.py (matmul decode rows on the CPU, padded SDPA)
    fast path   attention/cuda.py (flash-attn 2, family ``attention``, CUDA)
"""

from __future__ import annotations

import torch

from sambay.kernels import diff_decode as _dd
from sambay.kernels.attention import cuda, twin
from sambay.kernels.dispatch import use_fast

__all__ = ["attend", "attend_pair", "diff_attend"]


def attend(q, k, v, mask, causal: bool, scale: float, dropout_p: float = 0.0, flash=None,
           backend: str = "auto") -> torch.Tensor:
    """One attention map, softmax(q k^T * scale) v. See ``attend_ref``. ``flash`` is (causal, window) when the
    call's visibility is exactly flash-attn's bottom-right causal (+ window of ``window`` keys) with no padding,
    else None; ``mask``/``causal`` describe the same visibility for the twin."""
    if use_fast("attention", backend, (q, k, v), cuda.unsupported_flash(q, k, v, flash, dropout_p)):
        return cuda.attend_flash(q, k, v, flash, scale, dropout_p)
    return twin.attend(q, k, v, mask, causal, scale, dropout_p)


def attend_pair(q1, q2, k, v, mask, causal: bool, scale: float, dropout_p: float = 0.0, flash=None,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps of differential attention: (attend(q1, k[:, 0], v), attend(q2, k[:, 1], v)).
    Args: q1, q2 (B, Hq/2, tq, D); k (B, 2, G, tk, D) the two key stripes; v (B, G, tk, Dv)."""
    if use_fast("attention", backend, (q1, k, v), cuda.unsupported_flash(q1, k, v, flash, dropout_p)):
        return (cuda.attend_flash(q1, k[:, 0], v, flash, scale, dropout_p),
                cuda.attend_flash(q2, k[:, 1], v, flash, scale, dropout_p))
    return twin.attend_pair(q1, q2, k, v, mask, causal, scale, dropout_p)


def diff_attend(q1, q2, k, v, mask, causal: bool, scale: float, lam, dropout_p: float = 0.0, flash=None,
                backend: str = "auto", length: torch.Tensor | None = None) -> torch.Tensor:
    """Differential attention before the sub-layer norm: attend(q1, k[:, 0], v) - lam * attend(q2, k[:, 1], v).

    Args: q1, q2 (B, Hq/2, tq, D); k (B, 2, G, tk, D); v (B, G, tk, 2D); lam a 0-d tensor. Returns (B, Hq/2, tq, 2D).
    One decode row (tq = 1, no dropout) takes a fast path of the ``diff_decode`` family when one takes the call
    (:func:`sambay.kernels.diff_decode.fast_kernel`: the Triton flash-decoding kernel on CUDA, the C++ kernel on
    CPU; both read K and V once); everything else :func:`attend_pair`. ``length``: None, or a (1,) integer device
    tensor such that every key column from it on is invisible under ``mask`` (the static step's pos + 1); the
    decode kernels then read only the columns before it.
    """
    if q1.shape[2] == 1 and dropout_p == 0.0:
        kernel = _dd.fast_kernel(q1, k, v, lam, backend)
        if kernel is not None:
            B, H2, _, D = q1.shape
            q = torch.stack([q1[:, :, 0], q2[:, :, 0]], dim=2).view(B, 2 * H2, D)  # checkpoint order 2j, 2j+1
            valid = None if mask is None else mask[:, 0, 0]
            return kernel(q, k, v, valid, lam, scale, length)[:, :, None]
    o1, o2 = attend_pair(q1, q2, k, v, mask, causal, scale, dropout_p, flash, backend)
    return o1 - lam * o2
