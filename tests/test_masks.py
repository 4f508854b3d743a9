"""Attention plans against the visibility rule written out by brute force: key position j is visible to query
position i iff j is a real token, j <= i and (sliding layers) j > i - W. Every plan is expanded into the dense
(B, queries, key columns) matrix its SDPA calls apply and compared entry by entry."""

import pytest
import torch

from sambay.cache import KeyColumns
from sambay.masks import prefix_plan, sliding_plan, static_plans, window_plan


def dense(plan, B, tq, tk):
    """The visibility each query row gets from the plan's calls; rows outside every call stay all-False."""
    out = torch.zeros(B, tq, tk, dtype=torch.bool)
    covered = torch.zeros(tq, dtype=torch.int64)
    for c in plan:
        rows, cols = range(tq)[c.q], range(tk)[c.k]
        if c.mask is not None:
            m = c.mask[:, 0].expand(B, len(rows), len(cols))
        elif c.causal:
            assert len(rows) == len(cols) or c.k.start == 0
            m = torch.ones(len(rows), len(cols), dtype=torch.bool).tril(len(cols) - len(rows))[None].expand(B, -1, -1)
        else:
            m = torch.ones(B, len(rows), len(cols), dtype=torch.bool)
        out[:, c.q, c.k] = m
        covered[c.q] += 1
    assert covered.eq(1).all(), "every query row is in exactly one call"
    return out


def rule(qpos, kpos, kvalid, window):
    """(B, tq, tk) brute force. A row that sees no key (a padded query, whose output is zeroed) is returned as
    all-True: the plan may give it any non-empty set (see same())."""
    B = kvalid.shape[0]
    m = torch.zeros(B, len(qpos), len(kpos), dtype=torch.bool)
    for b in range(B):
        for i, q in enumerate(qpos):
            for j, k in enumerate(kpos):
                m[b, i, j] = k >= 0 and bool(kvalid[b, k]) and k <= q and (window is None or k > q - window)
            if not m[b, i].any():
                m[b, i] = True
    return m


def same(got, want):
    """Equal on every row that sees a key; rows that see none (all-True in ``want``) need some key (finite SDPA)."""
    free = want.all(-1, keepdim=True)
    return torch.equal(got | free, want) and bool(got.any(-1).all())


def left_padding(B, L, pads):
    v = torch.ones(B, L, dtype=torch.bool)
    for b, n in enumerate(pads):
        v[b, :n] = False
    return v


@pytest.mark.parametrize("p0, T, keep", [(0, 6, 6), (0, 6, 1), (0, 6, 2), (4, 3, 3), (4, 1, 1), (7, 5, 2)])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_prefix_plan_matches_the_rule(p0, T, keep, padded):
    B, S = 2, p0 + T
    kvalid = left_padding(B, S, [2, 0]) if padded else None
    plan = prefix_plan(p0, T, keep, kvalid, B, torch.device("cpu"))
    got = dense(plan, B, keep, S)
    want = rule(list(range(S - keep, S)), list(range(S)), kvalid if padded else torch.ones(B, S, dtype=torch.bool),
                None)
    assert same(got, want)


@pytest.mark.parametrize("W", [1, 3, 4, 7])
@pytest.mark.parametrize("p0, T", [(0, 1), (0, 5), (0, 23), (3, 4), (9, 2), (9, 17), (2, 30)])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_window_plan_matches_the_rule(W, p0, T, padded):
    """Chunks continuing from a ring of min(W, ...) slots, laid out as SlidingKV.columns says."""
    from sambay.cache import SlidingKV

    B, S = 2, p0 + T
    ring = SlidingKV(torch.zeros(B, 2, 1, W, 2), torch.zeros(B, 1, W, 4))
    cols = ring.columns(p0, T)
    kvalid = left_padding(B, S, [3, 0]) if padded else torch.ones(B, S, dtype=torch.bool)
    plan = window_plan(cols, W, kvalid if padded else None, B, torch.device("cpu"))
    kpos = ([] if cols.ring is None else cols.ring.tolist()) + list(range(cols.first, cols.first + cols.new))
    qpos = list(range(p0, p0 + T))
    assert same(dense(plan, B, T, len(kpos)), rule(qpos, kpos, kvalid, W))


def test_sliding_plan_blocks_long_inputs():
    """O(T * W): a long prefill is cut into query blocks that each see at most W/2 + W - 1 keys."""
    plan = sliding_plan(0, 64, 8, None, None, 1, torch.device("cpu"))
    assert len(plan) == 16 and max(c.k.stop - c.k.start for c in plan) <= 8 // 2 + 8 - 1


def test_unpadded_full_causal_needs_no_mask():
    plan = prefix_plan(0, 9, 9, None, 1, torch.device("cpu"))
    assert len(plan) == 1 and plan[0].mask is None and plan[0].causal
    plan = prefix_plan(5, 1, 1, None, 1, torch.device("cpu"))
    assert plan[0].mask is None and not plan[0].causal  # the last query sees every key


@pytest.mark.parametrize("pos", [0, 3, 6, 11])
def test_static_plans_match_the_rule(pos):
    """The static step: every slot of the full buffer and the ring, masked by position and padding."""
    from sambay.cache import SlidingKV

    B, L, W = 2, 12, 4
    valid = left_padding(B, L, [2, 0]) & (torch.arange(L) <= pos)
    valid[:, pos] = True  # cache.begin_static marks the new token real
    ring = SlidingKV(torch.zeros(B, 2, 1, W, 2), torch.zeros(B, 1, W, 4))
    p = torch.tensor([pos])
    sliding, kept = static_plans(p, ring.positions(p), valid, B)
    assert same(dense(kept, B, 1, L), rule([pos], list(range(L)), valid, None))
    rpos = ring.positions(p).tolist()
    assert same(dense(sliding, B, 1, W), rule([pos], rpos, valid, W))


def test_key_columns_describe_what_update_returns():
    """update() and columns() agree: the returned key at column c holds position kpos[c]."""
    from sambay.cache import SlidingKV

    W, B = 3, 1
    ring = SlidingKV(torch.zeros(B, 2, 1, W, 1), torch.zeros(B, 1, W, 2))

    def kv(p0, T):  # keys whose value is their own position
        k = torch.arange(p0, p0 + T, dtype=torch.float32).view(1, 1, 1, T, 1).expand(B, 2, 1, T, 1)
        return k.contiguous(), torch.zeros(B, 1, T, 2)

    for p0, T in [(0, 2), (2, 1), (3, 4), (7, 1), (8, 1), (9, 2)]:
        cols = ring.columns(p0, T)
        k, _ = ring.update(*kv(p0, T), p0)
        kpos = ([] if cols.ring is None else cols.ring.tolist()) + list(range(cols.first, cols.first + cols.new))
        written = [int(x) if x == x else -1 for x in k[0, 0, 0, :, 0].tolist()]
        assert [w for w, p in zip(written, kpos) if p >= 0] == [p for p in kpos if p >= 0], (p0, T)
    assert isinstance(cols, KeyColumns)
