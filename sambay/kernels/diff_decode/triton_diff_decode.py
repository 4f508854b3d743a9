"""Triton flash-decoding kernels for differential attention with one query token per sequence.

Twin: :func:`sambay.kernels.diff_decode.ref.diff_decode_ref` (shapes, semantics, the zero output of a
row with no visible slot). Public entry: :func:`sambay.kernels.diff_decode.diff_decode`.

Two kernels (flash-decoding, Dao et al. 2023):

1. ``_split_kernel``, grid (B * G, num_splits): one program per (sequence, kv pair, slot range). It holds
   the 2R query rows of the pair (R diff heads, positive and negative map) and walks its slot range in
   BLOCK_N steps. Each step loads the two K stripes and the V tile once, masked by ``valid`` (invisible
   slots are not loaded), and updates two online softmaxes: S0 = Q+ K0^T and S1 = Q- K1^T, then both
   probability tiles multiply the same V tile. It writes the running max (log2 units), the sum and the
   unnormalised 2D-wide accumulator of each map and diff head, in fp32.
2. ``_reduce_kernel``, grid (B * Hq/2,): rescales the splits of one diff head to a common max, sums,
   normalises (a head with no visible slot has sum 0 and gives 0) and writes O+ - lam * O- in q.dtype.

Numerics: scores and accumulators in fp32 (fp32 inputs use IEEE fp32 dots, no TF32); for 16-bit inputs
the probabilities are rounded to the input dtype for the tensor-core P @ V dot, as flash-attention does.
Strides of every input are passed, so views of a bigger buffer, sliding rings and project()'s permuted
K/V are read in place; offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sambay.kernels.diff_decode import choose_splits, diff_decode_tiles, num_sms

__all__ = ["diff_decode_triton"]

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the scores are kept in log2 units
# Software-pipeline depth of the split kernel's K/V loads (16-byte cp.async into shared memory): two tiles
# in flight. ~70 KB of shared memory per program at D = 64 (tiles sized by diff_decode_tiles), under the
# ~99 KB of consumer GPUs (checked by tests/kernels/test_diff_decode.py::test_gpu_codegen).
_STAGES = 3


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _online_step(s, m, lsum, acc, v_tile):
    """One flash step of a map: s (BLOCK_R, BLOCK_N) log2-unit scores, -inf at invisible slots.
    Returns the updated running max m, sum lsum (BLOCK_R,) and accumulator acc (BLOCK_R, BLOCK_V)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # Reference point for the exponentials: a row that has seen no visible slot yet has m_new = -inf;
    # use 0 there so exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN.
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - ref)
    p = tl.exp2(s - ref[:, None])
    lsum = lsum * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision="ieee")
    return m_new, lsum, acc


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, tiles_ptr,
    S, G, R, split_len, num_splits, qk_scale,                 # qk_scale = scale * log2(e)
    q_sb, q_sh, q_sd,
    k_sb, k_ss, k_sg, k_sn, k_sd,
    v_sb, v_sg, v_sn, v_sd,
    valid_sb, valid_sn,
    D: tl.constexpr,      # constexpr: with D == BLOCK_D the column masks fold away and loads vectorise
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_LEN: tl.constexpr,       # len_ptr holds the used length: slots from there on are neither visible nor read
    COUNT_TILES: tl.constexpr,   # debug: write the number of BLOCK_N tiles this program visited to tiles_ptr
):
    """Partials of one (b, g, split): m, l (B, Hq/2, 2, num_splits) and acc (B, Hq/2, 2, num_splits, 2D).
    A split wholly past the used length loads nothing and writes the empty partial (m = -inf, l = 0, acc = 0)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // G).to(tl.int64)
    g = (pid % G).to(tl.int64)
    rows = tl.arange(0, BLOCK_R)                  # r: diff head j = g * R + r (rows >= R are padding)
    row_ok = rows < R
    dcol = tl.arange(0, BLOCK_D)
    vcol = tl.arange(0, BLOCK_V)
    d_ok = dcol < D
    v_ok = vcol < 2 * D
    j = g * R + rows

    # The pair's query rows: q head 2j (positive map, reads K stripe 0) and 2j+1 (negative, stripe 1).
    q_offs = b * q_sb + dcol[None, :] * q_sd
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_pos = tl.load(q_ptr + q_offs + (2 * j)[:, None] * q_sh, mask=q_mask, other=0.0)
    q_neg = tl.load(q_ptr + q_offs + (2 * j + 1)[:, None] * q_sh, mask=q_mask, other=0.0)

    m_pos = tl.full([BLOCK_R], float("-inf"), tl.float32)
    m_neg = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_pos = tl.zeros([BLOCK_R], tl.float32)
    l_neg = tl.zeros([BLOCK_R], tl.float32)
    acc_pos = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
    acc_neg = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)

    k0_base = k_ptr + b * k_sb + g * k_sg           # stripe 0 of pair g; stripe 1 is + k_ss
    v_base = v_ptr + b * v_sb + g * v_sg
    start = split * split_len
    end = tl.minimum(start + split_len, S)
    if HAS_LEN:
        # The length is read on the device, so the grid and every shape stay fixed (a CUDA graph replays it).
        end = tl.minimum(end, tl.load(len_ptr).to(tl.int32))
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n64 = n.to(tl.int64)
        vis = tl.load(valid_ptr + b * valid_sb + n64 * valid_sn, mask=n < end, other=0) != 0   # (BLOCK_N,)
        k_offs = n64[:, None] * k_sn + dcol[None, :] * k_sd
        k_mask = vis[:, None] & d_ok[None, :]
        k0 = tl.load(k0_base + k_offs, mask=k_mask, other=0.0)                      # (BLOCK_N, BLOCK_D)
        k1 = tl.load(k0_base + k_ss + k_offs, mask=k_mask, other=0.0)
        vt = tl.load(v_base + n64[:, None] * v_sn + vcol[None, :] * v_sd,
                     mask=vis[:, None] & v_ok[None, :], other=0.0)                  # (BLOCK_N, BLOCK_V)

        s_pos = tl.dot(q_pos, tl.trans(k0), input_precision="ieee") * qk_scale     # (BLOCK_R, BLOCK_N) fp32
        s_neg = tl.dot(q_neg, tl.trans(k1), input_precision="ieee") * qk_scale
        s_pos = tl.where(vis[None, :], s_pos, float("-inf"))
        s_neg = tl.where(vis[None, :], s_neg, float("-inf"))
        m_pos, l_pos, acc_pos = _online_step(s_pos, m_pos, l_pos, acc_pos, vt)
        m_neg, l_neg, acc_neg = _online_step(s_neg, m_neg, l_neg, acc_neg, vt)

    # Partial row of (b, j, map, split): ((b * Hd + j) * 2 + map) * num_splits + split, Hd = G * R.
    row_pos = ((b * G * R + j) * 2) * num_splits + split
    row_neg = row_pos + num_splits
    tl.store(m_ptr + row_pos, m_pos, mask=row_ok)
    tl.store(m_ptr + row_neg, m_neg, mask=row_ok)
    tl.store(l_ptr + row_pos, l_pos, mask=row_ok)
    tl.store(l_ptr + row_neg, l_neg, mask=row_ok)
    acc_mask = row_ok[:, None] & v_ok[None, :]
    tl.store(acc_ptr + row_pos[:, None] * (2 * D) + vcol[None, :], acc_pos, mask=acc_mask)
    tl.store(acc_ptr + row_neg[:, None] * (2 * D) + vcol[None, :], acc_neg, mask=acc_mask)
    if COUNT_TILES:
        tl.store(tiles_ptr + pid * num_splits + split, tl.maximum(end - start + BLOCK_N - 1, 0) // BLOCK_N)


@triton.jit
def _combine(m_ptr, l_ptr, acc_ptr, row0, num_splits, V, vcol, v_ok,
             BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr):
    """Normalised output (BLOCK_V,) of one map from its num_splits partial rows starting at row0."""
    mx = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mx = tl.maximum(mx, tl.load(m_ptr + row0 + s, mask=s < num_splits, other=float("-inf")))
    top = tl.max(mx, axis=0)
    ref = tl.where(top == float("-inf"), 0.0, top)    # no visible slot anywhere: every weight is 0
    total = tl.zeros([BLOCK_S], tl.float32)
    o = tl.zeros([BLOCK_V], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < num_splits
        w = tl.exp2(tl.load(m_ptr + row0 + s, mask=s_ok, other=float("-inf")) - ref)         # (BLOCK_S,)
        total += tl.load(l_ptr + row0 + s, mask=s_ok, other=0.0) * w
        a = tl.load(acc_ptr + (row0 + s)[:, None] * V + vcol[None, :], mask=s_ok[:, None] & v_ok[None, :],
                    other=0.0)
        o += tl.sum(a * w[:, None], axis=0)
    denom = tl.sum(total, axis=0)
    return o / tl.where(denom == 0.0, 1.0, denom)     # denom 0 only with o = 0: the row's output is 0


@triton.jit
def _reduce_kernel(m_ptr, l_ptr, acc_ptr, lam_ptr, out_ptr, lam_value, num_splits, V: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, LAM_FROM_PTR: tl.constexpr):
    """out[b, j] = O+ - lam * O-; one program per (b, j) (pid = b * Hd + j); out (B, Hd, V) contiguous."""
    pid = tl.program_id(0).to(tl.int64)
    vcol = tl.arange(0, BLOCK_V)
    v_ok = vcol < V
    row0 = pid * 2 * num_splits
    o_pos = _combine(m_ptr, l_ptr, acc_ptr, row0, num_splits, V, vcol, v_ok, BLOCK_S, BLOCK_V)
    o_neg = _combine(m_ptr, l_ptr, acc_ptr, row0 + num_splits, num_splits, V, vcol, v_ok, BLOCK_S, BLOCK_V)
    if LAM_FROM_PTR:
        lam = tl.load(lam_ptr).to(tl.float32)
    else:
        lam = lam_value
    out = o_pos - lam * o_neg
    tl.store(out_ptr + pid * V + vcol, out.to(out_ptr.dtype.element_ty), mask=v_ok)


# ----------------------------------------------------------------------------------------------- launcher
def diff_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                       lam: torch.Tensor | float, scale: float, length: torch.Tensor | None = None, *,
                       num_splits: int | None = None, block_n: int | None = None,
                       tile_counts: torch.Tensor | None = None) -> torch.Tensor:
    """The kernels behind :func:`sambay.kernels.diff_decode.diff_decode` (arguments already checked there).

    length: None or a one-element integer tensor on q's device: only slots below it are read (the split
    kernel's loop stops there; the grid does not change with it).
    num_splits, block_n: override the launch geometry (tests use them to force many splits and ragged
    last blocks); by default :func:`choose_splits` and :func:`diff_decode_tiles` decide from the shapes
    and the device's SM count. tile_counts: a debug output, (B * G, num_splits) int32, receives the number
    of BLOCK_N-slot tiles each split program visited (tests count the bytes a call reads with it).
    Returns (B, Hq/2, 2D) in q.dtype.
    """
    B, Hq, D = q.shape
    G, S = k.shape[2], k.shape[3]
    R, Hd = Hq // 2 // G, Hq // 2
    tiles = diff_decode_tiles(D, q.dtype)
    if block_n is not None:
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"diff_decode_triton: block_n must be a power of two >= 16, got {block_n}")
        tiles["BLOCK_N"] = block_n
    if num_splits is None:
        num_splits, split_len = choose_splits(B, G, S, tiles["BLOCK_N"], num_sms(q.device))
    else:
        if num_splits < 1:
            raise ValueError(f"diff_decode_triton: num_splits must be >= 1, got {num_splits}")
        blocks = -(-S // tiles["BLOCK_N"])
        split_len = max(1, -(-blocks // num_splits)) * tiles["BLOCK_N"]
        num_splits = max(1, -(-S // split_len))    # every split non-empty, as choose_splits guarantees
    f32 = dict(device=q.device, dtype=torch.float32)
    m = torch.empty(B, Hd, 2, num_splits, **f32)
    lsum = torch.empty(B, Hd, 2, num_splits, **f32)
    acc = torch.empty(B, Hd, 2, num_splits, 2 * D, **f32)
    out = torch.empty(B, Hd, 2 * D, device=q.device, dtype=q.dtype)
    valid_u8 = valid.view(torch.uint8)              # same bytes, no copy; Triton loads bytes, not i1
    if tile_counts is not None and (tile_counts.shape != (B * G, num_splits) or tile_counts.dtype != torch.int32):
        raise ValueError(f"diff_decode_triton: tile_counts must be an int32 tensor of shape {(B * G, num_splits)}, "
                         f"got {tile_counts.dtype} {tuple(tile_counts.shape)}")
    _split_kernel[(B * G, num_splits)](
        q, k, v, valid_u8, valid_u8 if length is None else length, m, lsum, acc,
        m if tile_counts is None else tile_counts,
        S, G, R, split_len, num_splits, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *valid_u8.stride(),
        D=D, BLOCK_R=max(16, 1 << (R - 1).bit_length()), **tiles, HAS_LEN=length is not None,
        COUNT_TILES=tile_counts is not None, num_warps=4, num_stages=_STAGES)
    lam_tensor = isinstance(lam, torch.Tensor)
    _reduce_kernel[(B * Hd,)](
        m, lsum, acc, lam if lam_tensor else out, out, 0.0 if lam_tensor else float(lam), num_splits, 2 * D,
        BLOCK_S=min(32, max(2, 1 << (num_splits - 1).bit_length())), BLOCK_V=tiles["BLOCK_V"],
        LAM_FROM_PTR=lam_tensor, num_warps=4)
    return out
