"""The static decode step reads only the written prefix of the cache (target G8).

The split-K decode kernel takes the used length from a device tensor (the static step's ``cache.pos + 1``): the
grid and every shape stay those of the whole cache (capturable), but no split loads a slot at or past the length.
Checked under Triton's interpreter (CUDA when present): equal to the eager step, which attends a view of the
written prefix, at positions across the capacity; and the K/V bytes a call reads, counted from the tiles the
split programs really visited (the kernel's debug counter), grow with the position and not with the capacity.
The CPU kernel stops each sequence at its last visible slot: checked against the twin at positions across the
capacity (its reads are not counted).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from sambay.kernels.diff_decode import choose_splits, num_sms
from sambay.kernels.diff_decode.ref import diff_decode_ref

FP32_TOL = {"rtol": 2e-5, "atol": 2e-5}   # fp32 kernel vs fp32 twin: exp2 vs exp and summation order only
B, HQ, G, CAP, D = 2, 8, 2, 200, 16     # R = 2 diff heads per kv pair; 200 slots: ragged last tile



def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _cache(device, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, HQ, D, generator=g) * 2).to(device=device, dtype=dtype)
    k = torch.randn(B, 2, G, CAP, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, G, CAP, 2 * D, generator=g).to(device=device, dtype=dtype)
    pad = torch.rand(B, CAP, generator=g) < 0.1   # some padded (invisible) positions inside the prefix
    return q, k, v, pad.to(device)


def _run(q, k, v, valid, length, num_splits, block_n=16):
    """The kernel with its tile counter: (out, tiles visited per (b * G + g, split))."""
    from sambay.kernels.diff_decode.triton_diff_decode import diff_decode_triton

    S = k.shape[3]
    split_len = _cdiv(_cdiv(S, block_n), num_splits) * block_n
    num_splits = -(-S // split_len)              # as the launcher trims it: every split non-empty
    tiles = torch.full((B * G, num_splits), -1, dtype=torch.int32, device=q.device)
    out = diff_decode_triton(q, k, v, valid, 0.4, D ** -0.5, length, num_splits=num_splits, block_n=block_n,
                             tile_counts=tiles)
    return out, tiles


def _kv_bytes(tiles: torch.Tensor, block_n: int, item: int) -> int:
    """K/V bytes of the visited tiles: each tile loads block_n slots of both K stripes (D) and V (2D)."""
    return int(tiles.sum()) * block_n * 4 * D * item


@pytest.mark.triton
@pytest.mark.parametrize("pos", [0, 1, 15, 16, 17, 99, 150, CAP - 1])
def test_static_equals_eager_across_the_capacity(pos, interp_device):
    """Static (whole cache, slots after pos masked, length pos + 1) == eager (a view of positions 0..pos)."""
    q, k, v, pad = _cache(interp_device)
    slots = torch.arange(CAP, device=interp_device)
    valid = (slots <= pos)[None] & ~pad
    valid[:, 0] = True                          # every sequence sees one key at least
    length = torch.tensor([pos + 1], device=interp_device)
    static, tiles = _run(q, k, v, valid, length, num_splits=5)
    n = pos + 1
    eager, _ = _run(q, k[:, :, :, :n], v[:, :, :n], valid[:, :n].contiguous(), None, num_splits=5)
    torch.testing.assert_close(static, eager, **FP32_TOL)
    torch.testing.assert_close(static, diff_decode_ref(q, k, v, valid, 0.4, D ** -0.5), **FP32_TOL)
    # reads: the visited tiles cover exactly the written prefix, ceil'd to a tile within each split
    split_len = _cdiv(_cdiv(CAP, 16), 5) * 16
    want = sum(-(-max(0, min(n, (s + 1) * split_len) - s * split_len) // 16) for s in range(5))
    assert tiles.tolist() == [tiles[0].tolist()] * (B * G) and int(tiles[0].sum()) == want, (tiles, want)


@pytest.mark.triton
def test_length_overrides_valid(interp_device):
    """Slots at or past the length are invisible even where ``valid`` is True (kernel == twin)."""
    q, k, v, _ = _cache(interp_device, seed=1)
    valid = torch.ones(B, CAP, dtype=torch.bool, device=interp_device)
    for n in (1, 40, CAP):
        length = torch.tensor([n], device=interp_device)
        out, _ = _run(q, k, v, valid, length, num_splits=3)
        torch.testing.assert_close(out, diff_decode_ref(q, k, v, valid, 0.4, D ** -0.5, length), **FP32_TOL)
        torch.testing.assert_close(out, diff_decode_ref(q, k[:, :, :, :n], v[:, :, :n], valid[:, :n], 0.4,
                                                        D ** -0.5), **FP32_TOL)


@pytest.mark.triton
def test_bytes_grow_with_position_not_capacity(interp_device):
    """The K/V bytes a static step reads (counted from the tiles visited) are ~ the written prefix: the same for a
    cache four times larger, and far below the whole cache; without the length the kernel reads every tile."""
    item = 4
    counts = {}
    for cap_factor in (1, 4):
        cap = CAP * cap_factor
        g = torch.Generator().manual_seed(2)
        q = torch.randn(B, HQ, D, generator=g).to(interp_device)
        k = torch.randn(B, 2, G, cap, D, generator=g).to(interp_device)
        v = torch.randn(B, G, cap, 2 * D, generator=g).to(interp_device)
        for n in (13, 50, CAP):
            valid = (torch.arange(cap, device=interp_device) < n)[None].expand(B, cap).contiguous()
            length = torch.tensor([n], device=interp_device)
            _, tiles = _run(q, k, v, valid, length, num_splits=8)
            counts[cap, n] = _kv_bytes(tiles, 16, item)
            exact = B * G * n * 4 * D * item
            assert exact <= counts[cap, n] <= exact + B * G * 8 * 16 * 4 * D * item   # at most a tile per split
        _, all_tiles = _run(q, k, v, valid, None, num_splits=8)
        assert _kv_bytes(all_tiles, 16, item) >= B * G * cap * 4 * D * item      # no length: the whole cache
    assert counts[CAP, 13] < counts[CAP, 50] < counts[CAP, CAP]
    assert counts[4 * CAP, 13] < counts[4 * CAP, 50] < 0.3 * B * G * 4 * CAP * 4 * D * item


@pytest.mark.slow
@pytest.mark.triton
def test_model_static_step_reads_the_written_prefix(interp_device, monkeypatch):
    """The model's static step (full and cross layers through the kernel, as on CUDA) equals the eager step at
    positions across a 200-slot cache, and each of its length-aware calls visits tiles of the prefix only."""
    from helpers import random_model

    dd = importlib.import_module("sambay.kernels.diff_decode")
    ddt = importlib.import_module("sambay.kernels.diff_decode.triton_diff_decode")
    real_kernel = ddt.diff_decode_triton
    visited = []

    def counting(q, k, v, valid, lam, scale, length=None, **kw):
        splits, _ = choose_splits(q.shape[0], k.shape[2], k.shape[3], 16, num_sms(q.device))
        tiles = torch.zeros(q.shape[0] * k.shape[2], splits, dtype=torch.int32)
        out = real_kernel(q, k, v, valid, lam, scale, length, num_splits=splits, block_n=16, tile_counts=tiles)
        if length is not None:
            visited.append((int(length), tiles.sum(1).tolist(), splits))
        return out
    monkeypatch.setattr(ddt, "diff_decode_triton", counting)
    monkeypatch.setattr(dd, "fast_kernel", lambda *a, **kw: dd.diff_decode_triton)   # as "auto" on CUDA
    model = random_model(sliding_window=4)
    cap = 200
    base = model.allocate_cache(1, cap)
    g = torch.Generator().manual_seed(3)
    for t in base.tensors()[2:]:
        t.copy_(torch.randn(t.shape, generator=g))
    token = torch.tensor([7])
    with torch.no_grad():
        for p in (3, 17, 100, cap - 1):
            steps = []
            for static in (True, False):
                cache = model.allocate_cache(1, cap)
                for dst, src in zip(cache.tensors(), base.tensors()):
                    dst.copy_(src)
                cache.seek(p)
                steps.append(model(token[:, None], cache=cache, static=static).logits)
            torch.testing.assert_close(steps[0], steps[1], rtol=1e-4, atol=1e-5)
    # the static steps' full and cross layers: one call each per position, visiting ceil((p + 1) / 16) tiles
    # in all (each split rounds up to a tile at most), whatever the capacity
    assert [n for n, _, _ in visited] == [p + 1 for p in (3, 17, 100, cap - 1) for _ in range(len(visited) // 4)]
    for n, per_program, splits in visited:
        for tiles in per_program:
            assert n <= tiles * 16 <= n + 16 * splits, (n, tiles, splits)


def test_released_config_bytes_per_step():
    """G5/G8 at the released config (bf16, batch 1, a 34816-slot cache): the bytes one layer's static step reads
    at 1/16, 1/2 and the whole of the capacity grow with the position; K and V are read once (ideal + the
    fp32 partials and q per split)."""
    from sambay.config import SambaYConfig
    from sambay.kernels.compile_check import CAPACITY, CONFIG
    from sambay.kernels.diff_decode import diff_decode_bytes

    cfg = SambaYConfig.from_json(CONFIG)
    args = (1, cfg.num_attention_heads, cfg.num_kv_pairs, CAPACITY, cfg.head_dim, torch.bfloat16)
    full = diff_decode_bytes(*args)
    rows = [diff_decode_bytes(*args, length=int(CAPACITY * f)) for f in (1 / 16, 1 / 2, 1)]
    assert rows[-1] == full
    assert rows[0].kernel < rows[1].kernel < rows[2].kernel and rows[0].kernel < 0.07 * full.kernel
    # beyond K/V read once: the valid mask (1 byte a used slot) and a fixed cost of the fixed grid (q per split and
    # the fp32 partials), the same at every fill level
    fixed = {r.kernel - r.ideal - int(CAPACITY * f) for r, f in zip(rows, (1 / 16, 1 / 2, 1))}
    assert len(fixed) == 1 and 0 < fixed.pop() < 0.01 * full.ideal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_kernel_stops_at_the_last_visible_slot(dtype):
    """The C++ kernel reads each sequence up to its last visible slot (the static step's masked tail is not read):
    equal to the twin at positions across the capacity, with the two sequences ending at different slots, a
    sequence with nothing visible, and a length that hides visible slots."""
    from sambay.kernels import dispatch
    from sambay.kernels.diff_decode import diff_decode_cpu

    if dispatch.cpu_probe() is not None:
        pytest.skip(f"the CPU kernels are not built: {dispatch.cpu_probe()}")
    q, k, v, pad = _cache("cpu", seed=4, dtype=dtype)
    lam = torch.tensor(0.4)
    slots = torch.arange(CAP)
    tol = FP32_TOL if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for pos in (0, 5, 63, 150, CAP - 1):
        valid = torch.stack([slots <= pos, slots <= pos // 2]) & ~pad
        valid[:, 0] = True
        ref = diff_decode_ref(q, k, v, valid, lam, D ** -0.5)
        torch.testing.assert_close(diff_decode_cpu(q, k, v, valid, lam, D ** -0.5), ref, **tol)
        length = torch.tensor([pos + 1])
        torch.testing.assert_close(diff_decode_cpu(q, k, v, torch.ones_like(valid), lam, D ** -0.5, length),
                                   diff_decode_ref(q, k, v, torch.ones_like(valid), lam, D ** -0.5, length), **tol)
    nothing = torch.zeros(B, CAP, dtype=torch.bool)
    nothing[0, 3] = True
    out = diff_decode_cpu(q, k, v, nothing, lam, D ** -0.5)
    assert out[1].abs().max() == 0
    torch.testing.assert_close(out, diff_decode_ref(q, k, v, nothing, lam, D ** -0.5), **tol)
