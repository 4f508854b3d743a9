"""Differential-attention decode in plain PyTorch: the executable spec of :func:`sambay.kernels.diff_decode`.

One query token per sequence attends a K/V in sambay's cache layout (``sambay.cache``):

    q: (B, Hq, D)          heads in checkpoint order; diff head j uses q heads 2j (positive) and 2j+1 (negative)
    k: (B, 2, G, S, D)     stripe s holds K heads s, 2+s, 4+s, ...: kv pair g = (K heads 2g, 2g+1)
    v: (B, G, S, 2D)       pair g = [v_2g | v_2g+1]
    valid: (B, S) bool     True = the slot is visible (written, a real token, inside the window)

With R = (Hq / 2) / G diff heads per kv pair (consecutive GQA: diff head j reads pair g = j // R):

    out_j = softmax(q_2j k_0g^T * scale) V_g - lam * softmax(q_2j+1 k_1g^T * scale) V_g      (B, Hq/2, 2D)

The keys carry no position (NoPE), so slot order does not matter: a sliding ring whose slots are out of
position order is attended as is, its visibility given by ``valid``. A sequence with no visible slot
gets an output of zeros (both maps are defined as 0 there rather than a softmax over nothing).

The math runs in fp32 (fp64 for fp64 inputs) and is rounded once to ``q.dtype``; lam is applied in that
precision too. Both probability maps multiply V in one matmul, so V is read once (as the kernel does).
"""

from __future__ import annotations

import torch

__all__ = ["check_diff_decode_args", "diff_decode_ref"]


def check_diff_decode_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                           lam: torch.Tensor | float, length: torch.Tensor | None = None
                           ) -> tuple[int, int, int, int, int]:
    """Validate the arguments of diff_decode / diff_decode_ref; return (B, Hq, G, S, D).

    Raises ValueError (shapes, dtypes) naming the argument, what was expected and what was found.
    """
    if q.dim() != 3:
        raise ValueError(f"diff_decode: q must be (B, Hq, D), got shape {tuple(q.shape)}")
    B, Hq, D = q.shape
    if k.dim() != 5 or k.shape[0] != B or k.shape[1] != 2 or k.shape[4] != D:
        raise ValueError(f"diff_decode: k must be (B, 2, G, S, D) = ({B}, 2, G, S, {D}) in the cache layout, "
                         f"got shape {tuple(k.shape)}")
    G, S = k.shape[2], k.shape[3]
    if tuple(v.shape) != (B, G, S, 2 * D):
        raise ValueError(f"diff_decode: v must be (B, G, S, 2D) = {(B, G, S, 2 * D)} to match k, "
                         f"got shape {tuple(v.shape)}")
    if G < 1 or Hq % 2 or (Hq // 2) % G:
        raise ValueError(f"diff_decode: q's head count Hq={Hq} must be even and Hq/2 a multiple of the "
                         f"kv pair count G={G} (k.shape[2])")
    if tuple(valid.shape) != (B, S) or valid.dtype != torch.bool:
        raise ValueError(f"diff_decode: valid must be a (B, S) = {(B, S)} bool tensor, got shape "
                         f"{tuple(valid.shape)} dtype {valid.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"diff_decode: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if isinstance(lam, torch.Tensor) and lam.numel() != 1:
        raise ValueError(f"diff_decode: lam must be a float or a one-element tensor, got shape {tuple(lam.shape)}")
    if length is not None and (not isinstance(length, torch.Tensor) or length.numel() != 1
                               or length.dtype not in (torch.int32, torch.int64)):
        got = f"{length.dtype} {tuple(length.shape)}" if isinstance(length, torch.Tensor) else type(length).__name__
        raise ValueError(f"diff_decode: length must be None or a one-element int32/int64 tensor, got {got}")
    devices = {t.device for t in (q, k, v, valid)} | ({lam.device} if isinstance(lam, torch.Tensor) else set())
    if length is not None:
        devices.add(length.device)
    if len(devices) != 1:
        raise ValueError(f"diff_decode: q, k, v, valid (and a tensor lam) must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")
    return B, Hq, G, S, D


def _probs(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) over the visible slots, 0 for a row with none.

    q: (B, G, R, D); k: (B, G, S, D); visible: (B, S) bool. Returns (B, G, R, S).
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale                     # (B, G, R, S)
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)                                         # NaN on a row of only -inf
    return torch.where(visible.any(dim=-1)[:, None, None, None], p, torch.zeros_like(p))


def diff_decode_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                    lam: torch.Tensor | float, scale: float, length: torch.Tensor | None = None) -> torch.Tensor:
    """Differential attention of one query token per sequence over a cache-layout K/V (see the module doc).

    Args:
        q: (B, Hq, D); k: (B, 2, G, S, D); v: (B, G, S, 2D): one float dtype, any strides (views of a
            bigger buffer or of a ring are read in place).
        valid: (B, S) bool, True = visible slot. A row with no visible slot gives zeros.
        lam: the differential lambda, a float or a one-element tensor (any float dtype; used in fp32).
        scale: the softmax scale (D ** -0.5 in SambaY).
        length: None, or a one-element integer tensor on the device (the static decode step's ``cache.pos + 1``):
            slots at or after it are invisible whatever ``valid`` says, and the kernels do not read them.
    Returns:
        (B, Hq/2, 2D) in q.dtype: diff head j's 2D dims (heads 2j, 2j+1 after un-splitting).
    """
    B, Hq, G, S, D = check_diff_decode_args(q, k, v, valid, lam, length)
    if length is not None:
        valid = valid & (torch.arange(S, device=valid.device) < length.reshape(()))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    R = Hq // 2 // G
    qg = q.to(acc).reshape(B, G, R, 2, D)                                # diff head j = g * R + r, map m
    kf = k.to(acc)
    p_pos = _probs(qg[:, :, :, 0], kf[:, 0], valid, scale)               # (B, G, R, S)
    p_neg = _probs(qg[:, :, :, 1], kf[:, 1], valid, scale)
    o = torch.matmul(torch.cat([p_pos, p_neg], dim=2), v.to(acc))        # (B, G, 2R, 2D): one read of V
    lam_acc = lam.to(device=q.device, dtype=acc).reshape(()) if isinstance(lam, torch.Tensor) else lam
    out = o[:, :, :R] - lam_acc * o[:, :, R:]                            # (B, G, R, 2D)
    return out.reshape(B, Hq // 2, 2 * D).to(q.dtype)
