"""Attention plans: which keys each query row sees, built once per forward and shared by all layers
of a kind (all sliding layers share one plan, the full-attention layer one, the cross layers one).

Visibility rule (docs/ARCHITECTURE.md 4.8): key position j is visible to query position i iff the key is a
real token, j <= i, and for sliding layers j > i - W (W keys including the current one). A plan is a
list of SDPA calls; masks are skipped whenever the rule reduces to "all keys" or plain causal.
"""

from __future__ import annotations

import torch

from sambay.layers.attention import AttnCall
from sambay.states import KeyColumns


def visible(qpos: torch.Tensor, kpos: torch.Tensor, kvalid: torch.Tensor | None, window: int | None,
            batch: int) -> torch.Tensor:
    """(B, 1, tq, tk) bool mask. qpos: (tq,), kpos: (tk,) absolute positions (-1 = empty slot),
    kvalid: (B, tk) real-token flags or None. Rows with no visible key (padded queries) see every
    key instead, so SDPA stays finite; their outputs are zeroed afterwards (q_valid)."""
    m = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
    if window is not None:
        m = m & (kpos[None, :] > qpos[:, None] - window)
    m = m[None].expand(batch, -1, -1)
    if kvalid is not None:
        m = m & kvalid[:, None, :]
    m = m | ~m.any(-1, keepdim=True)
    return m[:, None]


def prefix_plan(p0: int, T: int, q_rows: int, kvalid: torch.Tensor | None, batch: int,
                device: torch.device) -> list[AttnCall]:
    """Plan for full and cross attention: the keys are positions 0..p0+T-1 (a prefix), the queries are
    the last ``q_rows`` of the T new positions p0..p0+T-1. kvalid: (B, p0+T) or None."""
    S = p0 + T
    flash = None if kvalid is not None else (q_rows > 1, None)
    if kvalid is None:
        if q_rows == 1:
            return [AttnCall(slice(0, 1), slice(0, S), flash=flash)]  # the last query sees every key
        if q_rows == S:
            return [AttnCall(slice(0, q_rows), slice(0, S), causal=True, flash=flash)]
    qpos = torch.arange(S - q_rows, S, device=device)
    kpos = torch.arange(S, device=device)
    return [AttnCall(slice(0, q_rows), slice(0, S), visible(qpos, kpos, kvalid, None, batch), flash=flash)]


def sliding_plan(p0: int, T: int, window: int, ring_pos: torch.Tensor | None, kvalid: torch.Tensor | None,
                 batch: int, device: torch.device) -> list[AttnCall]:
    """Plan for sliding-window attention over keys laid out as [ring slots | T new keys].

    ring_pos: (R,) positions held by the ring before this call (-1 = empty), or None when the ring
    is not read (no cache, or nothing cached yet). kvalid: (B, p0+T) real-token flags by position, or
    None. Long inputs are cut into query blocks of ``window // 2`` rows that only see the keys their window
    can reach, so the cost is O(T * W), not O(T^2).
    """
    R = 0 if ring_pos is None else ring_pos.numel()
    new_pos = torch.arange(p0, p0 + T, device=device)
    kpos_all = new_pos if ring_pos is None else torch.cat([ring_pos, new_pos])
    kvalid_all = None
    if kvalid is not None:
        kvalid_all = kvalid[:, kpos_all.clamp(min=0)] & (kpos_all >= 0)
    # Query blocks of half a window see W/2 + W - 1 keys: 1.5x the useful scores rather than 2x with
    # whole-window blocks, in few enough SDPA calls (measured: 17% faster at 8K tokens, W = 512).
    block = T if T <= 2 * window else max(1, window // 2)
    plan = []
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        # Ring slots hold positions < p0; only queries with t0 < window - 1 can reach them.
        k0 = 0 if t0 < window - 1 else R + t0 - window + 1
        # flash-attn's window is by key index, right only when keys are in position order (no ring slots)
        flash = (True, window) if kvalid_all is None and (ring_pos is None or k0 >= R) else None
        if kvalid_all is None and ring_pos is None and t0 == 0 and t1 <= window:
            plan.append(AttnCall(slice(t0, t1), slice(0, t1), causal=True, flash=flash))  # window covers all
            continue
        kv = None if kvalid_all is None else kvalid_all[:, k0:R + t1]
        mask = visible(new_pos[t0:t1], kpos_all[k0:R + t1], kv, window, batch)
        plan.append(AttnCall(slice(t0, t1), slice(k0, R + t1), mask, flash=flash))
    return plan


def ring_plan(ring_pos: torch.Tensor, full: bool, kvalid: torch.Tensor | None, batch: int) -> list[AttnCall]:
    """Plan for one decode token attending its ring after the token was written into it.

    ring_pos: (R,) positions held by each slot (-1 = empty). All held positions are inside the window
    (the ring has at most W slots), so the mask only removes empty slots and padding."""
    R = ring_pos.numel()
    if full and kvalid is None:
        return [AttnCall(slice(0, 1), slice(0, R), flash=(False, None))]  # every slot visible, order irrelevant
    kv = (ring_pos >= 0)[None].expand(batch, -1)
    if kvalid is not None:
        kv = kv & kvalid[:, ring_pos.clamp(min=0)]
        kv = kv | ~kv.any(-1, keepdim=True)  # a padded decode query sees no key: let it see all (zeroed later)
    return [AttnCall(slice(0, 1), slice(0, R), kv[:, None, None, :])]


def static_plans(pos: torch.Tensor, ring_pos: torch.Tensor | None, valid: torch.Tensor,
                 batch: int) -> tuple[list[AttnCall], list[AttnCall]]:
    """Plans for the static decode step, whose shapes do not depend on the position: (sliding, kept).

    pos: (1,) the new token's position; ring_pos: (R,) positions the ring slots hold after the write (or
    None without sliding layers); valid: (B, L) real-token flags of the whole cache. The full and cross
    layers attend over all L slots, with the slots after ``pos`` masked, and the call's ``length`` (pos + 1)
    lets the decode kernels stop reading there.
    """
    L = valid.shape[1]
    kpos = torch.arange(L, device=valid.device)
    full = (kpos <= pos)[None] & valid
    kept = [AttnCall(slice(0, 1), slice(0, L), full[:, None, None, :], length=pos + 1)]
    if ring_pos is None:
        return [], kept
    kv = (ring_pos >= 0)[None] & valid[:, ring_pos.clamp(min=0)]
    kv = kv | ~kv.any(-1, keepdim=True)
    return [AttnCall(slice(0, 1), slice(0, ring_pos.numel()), kv[:, None, None, :])], kept


def window_plan(cols: KeyColumns, window: int, kvalid: torch.Tensor | None, batch: int,
                device: torch.device) -> list[AttnCall]:
    """Plan for the sliding layers over the key columns their cache state returns (``SlidingKV.columns``), or
    over the new keys alone without a cache. kvalid: (B, cols.first + cols.new) real-token flags or None."""
    if cols.new == 0:  # one decode token over its ring, written first
        return ring_plan(cols.ring, cols.first >= cols.ring_size - 1, kvalid, batch)
    return sliding_plan(cols.first, cols.new, window, cols.ring, kvalid, batch, device)
