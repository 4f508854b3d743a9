"""Differential-attention decode: the Triton flash-decoding kernel vs its PyTorch twin, and the twin vs
a naive float64 formula written from the Hugging Face head layout (:func:`to_reference_layout`).

Small odd shapes run under Triton's CPU interpreter (or compiled, on a CUDA machine): slot counts that
are not block multiples, padding and fully masked rows, batch > 1, GQA ratios 1 to 4, a sliding ring
that has wrapped (slots out of position order), views of a bigger buffer and project()'s permuted K/V.
Allocations are NaN-poisoned, so a partial or output element the kernels forget to write shows up.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from sambay.cache import FullKV, SlidingKV
from sambay.kernels import dispatch
from sambay.kernels.diff_decode import choose_splits, diff_decode, diff_decode_bytes, diff_decode_tiles
from sambay.kernels.diff_decode.ref import diff_decode_ref
from sambay.layers.attention import to_reference_layout

# The module objects (not the same-named functions a package re-export could bind to these names).
dd = importlib.import_module("sambay.kernels.diff_decode")

FP32_TOL = {"rtol": 2e-5, "atol": 2e-5}   # fp32 kernel vs fp32 twin: exp2 vs exp and summation order only


def _randn(*shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


def _inputs(B, Hq, G, S, D, seed=0, p_invisible=0.0, dtype=torch.float32, device="cpu"):
    """Contiguous q (B, Hq, D), k (B, 2, G, S, D), v (B, G, S, 2D), valid (B, S). Scores ~ N(0, 4) so the
    softmaxes are peaked, not uniform, and a wrong key or scale is visible."""
    q = _randn(B, Hq, D, seed=seed, dtype=dtype, device=device, scale=2.0)
    k = _randn(B, 2, G, S, D, seed=seed + 1, dtype=dtype, device=device)
    v = _randn(B, G, S, 2 * D, seed=seed + 2, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed + 3)
    valid = (torch.rand(B, S, generator=g) >= p_invisible).to(device)
    return q, k, v, valid


def _naive(q, k, v, valid, lam, scale) -> torch.Tensor:
    """float64, one (sequence, diff head, map) at a time, in the checkpoint's head numbering: diff head j
    uses q heads 2j / 2j+1 against K heads 2g / 2g+1 and V heads [2g | 2g+1], g = j // R."""
    k_ref, v_ref = to_reference_layout(k.double().contiguous(), v.double().contiguous())   # (B, 2G, S, D)
    B, Hq, D = q.shape
    R = Hq // 2 // k.shape[2]
    lam = float(lam)
    out = torch.zeros(B, Hq // 2, 2 * D, dtype=torch.float64)
    for b in range(B):
        keys = valid[b].cpu().nonzero().flatten()
        if len(keys) == 0:
            continue   # the documented convention: no visible slot -> zeros
        for j in range(Hq // 2):
            g = j // R
            for m, weight in ((0, 1.0), (1, -lam)):
                a = torch.softmax(k_ref[b, 2 * g + m, keys].cpu() @ q[b, 2 * j + m].double().cpu() * scale, dim=0)
                o = torch.cat([a @ v_ref[b, 2 * g, keys].cpu(), a @ v_ref[b, 2 * g + 1, keys].cpu()])
                out[b, j] += weight * o
    return out


# ------------------------------------------------------------------------------------------- the twin
TWIN_CASES = [
    pytest.param(dict(B=1, Hq=4, G=2, S=7, D=8), 0.0, id="gqa1"),
    pytest.param(dict(B=3, Hq=8, G=2, S=11, D=8), 0.4, id="gqa2-padded-batch3"),
    pytest.param(dict(B=2, Hq=12, G=2, S=9, D=4), 0.3, id="gqa3"),
    pytest.param(dict(B=2, Hq=8, G=1, S=5, D=8), 0.0, id="gqa4-one-pair"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,p_invisible", TWIN_CASES)
def test_twin_matches_naive_float64(shape, p_invisible, dtype):
    q, k, v, valid = _inputs(**shape, p_invisible=p_invisible, dtype=dtype)
    valid[-1] = False if shape["B"] > 1 else valid[-1]      # a fully masked row where there are several
    lam, scale = torch.tensor(0.37), shape["D"] ** -0.5
    out = diff_decode_ref(q, k, v, valid, lam, scale)
    assert out.dtype == dtype and out.shape == (shape["B"], shape["Hq"] // 2, 2 * shape["D"])
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.double(), _naive(q, k, v, valid, lam, scale), **tol)


def test_twin_lam_float_and_tensor_agree():
    q, k, v, valid = _inputs(2, 8, 2, 6, 8)
    outs = [diff_decode_ref(q, k, v, valid, lam, 0.3) for lam in (0.5, torch.tensor(0.5), torch.tensor([0.5]),
                                                                     torch.tensor(0.5, dtype=torch.bfloat16))]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


# ------------------------------------------------------------------------------------- kernel vs twin

def _kernel(q, k, v, valid, lam, scale, **geometry):
    from sambay.kernels.diff_decode.triton_diff_decode import diff_decode_triton

    return diff_decode_triton(q, k, v, valid, lam, scale, **geometry)


# (shape, fraction of invisible slots, launch geometry): geometries force several splits, ragged last
# blocks and splits whose every slot is invisible.
KERNEL_CASES = [
    pytest.param(dict(B=1, Hq=4, G=2, S=37, D=16), 0.0, {}, id="gqa1-S37-default"),
    pytest.param(dict(B=1, Hq=4, G=2, S=37, D=16), 0.0, dict(block_n=16, num_splits=3), id="gqa1-S37-3splits"),
    pytest.param(dict(B=3, Hq=8, G=2, S=45, D=16), 0.5, dict(block_n=16, num_splits=2), id="gqa2-padded-batch3"),
    pytest.param(dict(B=2, Hq=12, G=2, S=50, D=16), 0.3, dict(block_n=16), id="gqa3-many-splits"),
    pytest.param(dict(B=2, Hq=8, G=1, S=33, D=16), 0.2, dict(block_n=16, num_splits=1), id="gqa4-one-split"),
    pytest.param(dict(B=2, Hq=4, G=1, S=21, D=12), 0.2, dict(block_n=16, num_splits=2), id="D12-padded-widths"),
    pytest.param(dict(B=1, Hq=4, G=2, S=1, D=16), 0.0, {}, id="S1"),
]


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("shape,p_invisible,geometry", KERNEL_CASES)
def test_kernel_matches_twin(shape, p_invisible, geometry, interp_device, poison_empty):
    q, k, v, valid = _inputs(**shape, p_invisible=p_invisible, device=interp_device)
    if shape["B"] > 1:
        valid[-1] = False                                    # a fully masked row
        valid[0, : shape["S"] - 1] = False                   # a row that sees exactly one slot (the last)
        valid[0, -1] = True
    lam, scale = torch.tensor(0.61, device=interp_device), shape["D"] ** -0.5
    out = _kernel(q, k, v, valid, lam, scale, **geometry)
    assert out.shape == (shape["B"], shape["Hq"] // 2, 2 * shape["D"]) and out.dtype == q.dtype
    assert (shape["B"], shape["Hq"] // 2, 2 * shape["D"]) in poison_empty      # the output was poisoned
    torch.testing.assert_close(out, diff_decode_ref(q, k, v, valid, lam, scale), **FP32_TOL)
    if shape["B"] > 1:
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))                 # exactly 0, not NaN


@pytest.mark.slow
@pytest.mark.triton
def test_kernel_ring_wrap(interp_device, poison_empty):
    """A sliding ring of 8 slots after 23 positions (slot p % 8 holds position p, so slots are out of position
    order), written by SlidingKV from project()'s permuted (strided) layout, with left padding on sequence 1:
    kernel == twin on the ring == twin on the same window's keys laid out in position order."""
    B, Hq, G, D, W, P = 2, 8, 2, 16, 8, 23
    dev = interp_device
    k_new = _randn(B, P, G, 2, D, seed=10, device=dev).permute(0, 3, 2, 1, 4)           # (B, 2, G, P, D) view
    v_new = _randn(B, P, G, 2 * D, seed=11, device=dev).transpose(1, 2)                  # (B, G, P, 2D) view
    real = torch.ones(B, P, dtype=torch.bool, device=dev)
    real[1, :17] = False                                     # sequence 1 is left-padded: 6 real tokens
    ring = SlidingKV(k=torch.zeros(B, 2, G, W, D, device=dev), v=torch.zeros(B, G, W, 2 * D, device=dev))
    ring.update(k_new, v_new, 0)
    pos = ring.positions(P - 1)                              # (W,) position held by each slot
    assert not torch.equal(pos, pos.sort().values)           # the ring has wrapped
    valid = (pos >= 0)[None] & real[:, pos.clamp(min=0)]     # (B, W): in the window and a real token
    q = _randn(B, 3, Hq * D, seed=12, device=dev)[:, 1].view(B, Hq, D)                  # a strided q row
    lam, scale = torch.tensor(0.45, device=dev), D ** -0.5

    out = _kernel(q, ring.k, ring.v, valid, lam, scale, block_n=16)
    twin = diff_decode_ref(q, ring.k, ring.v, valid, lam, scale)
    window = slice(P - W, P)                                  # the same keys, in position order
    ordered = diff_decode_ref(q, k_new[:, :, :, window], v_new[:, :, window], real[:, window], lam, scale)
    torch.testing.assert_close(out, twin, **FP32_TOL)
    torch.testing.assert_close(twin, ordered, rtol=1e-5, atol=1e-5)

    # A ring not yet full (5 of 8 slots written): the empty slots are invisible.
    ring.k.zero_()
    ring.v.zero_()
    ring.update(k_new[:, :, :, :5], v_new[:, :, :5], 0)
    pos = ring.positions(4)
    valid = (pos >= 0)[None] & real[:, pos.clamp(min=0)]
    assert (pos < 0).any() and not valid[1].any()            # sequence 1 has no real token yet -> zeros
    out = _kernel(q, ring.k, ring.v, valid, lam, scale, block_n=16, num_splits=2)
    torch.testing.assert_close(out, diff_decode_ref(q, ring.k, ring.v, valid, lam, scale), **FP32_TOL)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.slow
@pytest.mark.triton
def test_kernel_views_of_the_full_cache(interp_device, poison_empty):
    """The full-attention layer's K/V: the views FullKV.write returns (the first 34 of 50 positions) with
    their prefix of cache.valid, and the static form (the whole buffer, unwritten slots invisible)."""
    B, Hq, G, D, L, T = 2, 8, 2, 16, 50, 34
    dev = interp_device
    kv = FullKV(k=torch.full((B, 2, G, L, D), 1e4, device=dev), v=torch.full((B, G, L, 2 * D), 1e4, device=dev))
    k_new = _randn(B, T, G, 2, D, seed=20, device=dev).permute(0, 3, 2, 1, 4)
    v_new = _randn(B, T, G, 2 * D, seed=21, device=dev).transpose(1, 2)
    k, v = kv.update(k_new, v_new, 0)
    assert k.shape[3] == T and not k.is_contiguous() and not v.is_contiguous()
    cache_valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
    cache_valid[:, :T] = True
    cache_valid[0, :5] = False                               # left padding in sequence 0
    q = _randn(B, Hq, D, seed=22, device=dev, scale=2.0)
    lam, scale = 0.7, D ** -0.5                              # lam as a Python float

    out = _kernel(q, k, v, cache_valid[:, :T], lam, scale, block_n=16, num_splits=2)
    twin = diff_decode_ref(q, k, v, cache_valid[:, :T], lam, scale)
    torch.testing.assert_close(out, twin, **FP32_TOL)
    static = _kernel(q, kv.k, kv.v, cache_valid, lam, scale, block_n=16)   # 1e4 garbage in unwritten slots
    torch.testing.assert_close(static, twin, **FP32_TOL)


@pytest.mark.triton
def test_kernel_empty_context(interp_device):
    """S = 0 (nothing cached): one empty split, zeros, like the twin."""
    q, k, v, valid = _inputs(2, 4, 2, 0, 16, device=interp_device)
    out = _kernel(q, k, v, valid, 0.5, 0.25)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(diff_decode_ref(q, k, v, valid, 0.5, 0.25), out)


@pytest.mark.slow
@pytest.mark.triton
def test_kernel_lam_forms_agree(interp_device):
    q, k, v, valid = _inputs(1, 4, 2, 20, 16, device=interp_device)
    a = _kernel(q, k, v, valid, 0.3, 0.25, block_n=16)
    for lam in (torch.tensor(0.3, device=interp_device), torch.tensor([0.3], device=interp_device)):
        assert torch.equal(_kernel(q, k, v, valid, lam, 0.25, block_n=16), a)


def _judge_low_precision(got, q, k, v, valid, lam, scale):
    """16-bit kernel output vs float64 math: within one output rounding plus the rounding of the
    probabilities to the input dtype before the P @ V dot (<= eps * sum_s p_s |v_s| per map)."""
    exact = diff_decode_ref(q.double(), k.double(), v.double(), valid, lam, scale)
    eps = torch.finfo(q.dtype).eps
    bound = eps * exact.abs() + eps * (1 + abs(float(lam))) * v.double().abs().amax()
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g} over the bound (max bound {bound.max():.3g})"


@pytest.mark.slow
@pytest.mark.triton
def test_kernel_fp16(interp_device):
    """fp16 (the interpreter's bf16 tl.dot is wrong, so bf16 is checked on CUDA only)."""
    q, k, v, valid = _inputs(2, 8, 2, 45, 16, p_invisible=0.3, dtype=torch.float16, device=interp_device)
    out = _kernel(q, k, v, valid, 0.55, 0.25, block_n=16, num_splits=2)
    assert out.dtype == torch.float16
    _judge_low_precision(out, q, k, v, valid, 0.55, 0.25)


# ------------------------------------------------------------------------------------------- dispatch
def test_auto_picks_the_twin_on_cpu(monkeypatch):
    """On CPU tensors "auto" never runs Triton, even when TRITON_INTERPRET=1 is set (as in these tests): without
    the C++ kernel (its test is in test_cpu_decode.py) it runs the twin."""
    monkeypatch.setitem(dispatch._PROBES, "sambay_cpu", "not built (this test)")
    calls = []
    monkeypatch.setattr(dd, "diff_decode_ref", lambda *a: calls.append(1) or diff_decode_ref(*a))
    q, k, v, valid = _inputs(2, 4, 2, 9, 8, p_invisible=0.2)
    out = diff_decode(q, k, v, valid, 0.4, 0.3)
    assert calls == [1] and torch.equal(out, diff_decode_ref(q, k, v, valid, 0.4, 0.3))
    diff_decode(q, k, v, valid, 0.4, 0.3, backend="torch")
    assert calls == [1, 1]


@pytest.mark.triton
def test_backend_cuda_runs_the_kernel(interp_device, monkeypatch):
    ddt = importlib.import_module("sambay.kernels.diff_decode.triton_diff_decode")
    calls = []
    real = ddt.diff_decode_triton
    monkeypatch.setattr(ddt, "diff_decode_triton", lambda *a: calls.append(1) or real(*a))
    q, k, v, valid = _inputs(1, 4, 2, 17, 16, device=interp_device)
    out = diff_decode(q, k, v, valid, 0.4, 0.25, backend="cuda")
    assert calls == [1]
    torch.testing.assert_close(out, diff_decode_ref(q, k, v, valid, 0.4, 0.25), **FP32_TOL)


def test_backend_cuda_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_interpreter", lambda: False)
    q, k, v, valid = _inputs(1, 4, 2, 5, 8)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        diff_decode(q, k, v, valid, 0.4, 0.3, backend="cuda")


def test_gradients_take_the_twin(monkeypatch):
    """The kernel has no backward: "cuda" refuses a call that needs gradients, "auto" sends a CUDA call that
    needs them to the twin (checked on the dispatcher with the device hook saying CUDA), and the twin's
    gradients flow."""
    monkeypatch.setattr(dispatch, "triton_interpreter", lambda: True)
    q, k, v, valid = _inputs(1, 4, 2, 5, 8)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="no backward"):
        diff_decode(q, k, v, valid, 0.4, 0.3, backend="cuda")
    monkeypatch.setattr(dispatch, "on_cuda", lambda *t: True)
    monkeypatch.setitem(dispatch._PROBES, "diff_decode", None)
    assert dispatch.use_fast("diff_decode", "auto", (q,), None) and not dispatch.use_fast("diff_decode", "auto", (q,),
                                                                                          "grad")
    monkeypatch.setattr(dispatch, "on_cuda", lambda *t: False)
    diff_decode(q, k, v, valid, 0.4, 0.3).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    with torch.no_grad():
        assert not dd.needs_grad(q, k, v, 0.4)


@pytest.mark.parametrize("bad,match", [
    (dict(backend="triton"), "backend must be one of"),
    (dict(q=torch.zeros(1, 5, 8)), "Hq=5 must be even"),
    (dict(q=torch.zeros(1, 6, 8)), "multiple of the kv pair count G=2"),
    (dict(k=torch.zeros(1, 2, 2, 5, 4)), "k must be"),
    (dict(v=torch.zeros(1, 2, 5, 8)), "v must be"),
    (dict(valid=torch.ones(1, 5)), "valid must be a"),
    (dict(valid=torch.ones(1, 4, dtype=torch.bool)), "valid must be a"),
    (dict(q=torch.zeros(1, 4, 8, dtype=torch.float64)), "share one float dtype"),
    (dict(lam=torch.ones(2)), "one-element tensor"),
], ids=["backend", "odd-Hq", "gqa", "k-shape", "v-shape", "valid-dtype", "valid-shape", "dtype", "lam"])
def test_bad_arguments_raise(bad, match):
    args = dict(q=torch.zeros(1, 4, 8), k=torch.zeros(1, 2, 2, 5, 8), v=torch.zeros(1, 2, 5, 16),
                valid=torch.ones(1, 5, dtype=torch.bool), lam=0.5, scale=0.3, backend="torch")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        diff_decode(**args)
    if "backend" not in bad:                                 # the twin checks the same way
        args.pop("backend")
        with pytest.raises(ValueError, match=match):
            diff_decode_ref(**args)


# ----------------------------------------------------------------------------------- launch geometry
@pytest.mark.parametrize("B,G,S,expect", [
    (1, 10, 32768, "fills"), (16, 10, 32768, "fills"),    # enough slots: >= 2 programs per SM (132 SMs)
    (1, 10, 512, 2), (1, 10, 4096, 16),                   # shorter contexts: splits of 4 blocks (256 slots)
    (64, 10, 100, 1), (1, 1, 5, 1), (3, 2, 0, 1),         # the batch fills the GPU; tiny; empty
])
def test_choose_splits(B, G, S, expect):
    block_n, sms = 64, 132
    splits, split_len = choose_splits(B, G, S, block_n, sms)
    assert split_len % block_n == 0 and split_len > 0
    assert S == 0 or (splits - 1) * split_len < S <= splits * split_len     # every split non-empty
    if expect == "fills":
        assert 2 * sms <= B * G * splits and B * G * (splits - 1) < 2 * sms
    else:
        assert splits == expect


def test_bytes_formula():
    """Ideal = K + V + q + out; the kernel adds q per split, valid and the fp32 partials (written + read).
    At SambaY's shapes that is < 1% over the ideal at batch 1 and a 32K context, < 5% everywhere (target G5)."""
    B, Hq, G, S, D = 1, 40, 10, 32768, 64
    n = diff_decode_bytes(B, Hq, G, S, D, torch.bfloat16)
    kv = B * G * S * (2 * D) * 2 + B * G * S * (2 * D) * 2
    assert n.ideal == kv + B * Hq * D * 2 + B * (Hq // 2) * (2 * D) * 2
    assert n.num_splits == choose_splits(B, G, S, diff_decode_tiles(D, torch.bfloat16)["BLOCK_N"], 132)[0]
    extra = B * Hq * D * 2 * (n.num_splits - 1) + B * S + 2 * B * (Hq // 2) * 2 * n.num_splits * (2 + 2 * D) * 4
    assert n.kernel == n.ideal + extra
    assert n.kernel <= 1.01 * n.ideal, n
    for shape in ((16, 40, 10, 32768, 64), (1, 40, 10, 4096, 64), (1, 40, 10, 512, 64), (16, 40, 10, 512, 64)):
        b = diff_decode_bytes(*shape, torch.bfloat16)
        assert b.ideal < b.kernel <= 1.05 * b.ideal, (shape, b)


@pytest.mark.triton
def test_bytes_match_the_launcher(interp_device, poison_empty):
    """The partials the count assumes are the buffers the launcher allocates (shapes seen by poisoned empty)."""
    B, Hq, G, S, D = 2, 8, 2, 40, 16
    q, k, v, valid = _inputs(B, Hq, G, S, D, device=interp_device)
    _kernel(q, k, v, valid, 0.5, 0.25)
    ns = diff_decode_bytes(B, Hq, G, S, D, torch.float32).num_splits
    assert sorted(poison_empty) == sorted([(B, Hq // 2, 2, ns), (B, Hq // 2, 2, ns), (B, Hq // 2, 2, ns, 2 * D),
                                           (B, Hq // 2, 2 * D)])


# ------------------------------------------------------------------------------------ GPU compilation
@pytest.mark.slow
def test_gpu_codegen(gpu_codegen):
    """Without a GPU: both kernels compile for sm_90 and sm_80 at SambaY's head dim, bf16 and fp32, with the
    launcher's tiles and pipeline depth; the bf16 dots run on tensor cores, the shared memory fits the ~99 KB
    of consumer GPUs and the partial accumulators are written and read with 16-byte accesses. (The K/V tiles are
    loaded with 16-byte cp.async into shared memory, which this check does not count.)"""
    from sambay.kernels.diff_decode.triton_diff_decode import _STAGES

    split_ptrs = ["q_ptr", "k_ptr", "v_ptr", "valid_ptr", "m_ptr", "l_ptr", "acc_ptr"]
    split_ints = ["S", "G", "R", "split_len", "num_splits", "q_sb", "q_sh", "k_sb", "k_ss", "k_sg", "k_sn",
                  "v_sb", "v_sg", "v_sn", "valid_sb"]
    cases = []
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        tiles = diff_decode_tiles(64, dtype)
        cases.append({"module": "sambay.kernels.diff_decode.triton_diff_decode", "kernel": "_split_kernel",
                      "signature": {**{p: f"*{name}" for p in split_ptrs[:3]}, "valid_ptr": "*u8",
                                    **{p: "*fp32" for p in split_ptrs[4:]}, **dict.fromkeys(split_ints, "i32"),
                                    "qk_scale": "fp32"},
                      "constexprs": {**tiles, "D": 64, "BLOCK_R": 16, "q_sd": 1, "k_sd": 1, "v_sd": 1, "valid_sn": 1},
                      "divisible": split_ptrs + ["q_sb", "q_sh", "k_sb", "k_ss", "k_sg", "k_sn", "v_sb", "v_sg",
                                                 "v_sn"],
                      "options": {"num_warps": 4, "num_stages": _STAGES}, "archs": [80, 90]})
        cases.append({"module": "sambay.kernels.diff_decode.triton_diff_decode", "kernel": "_reduce_kernel",
                      "signature": {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "lam_ptr": "*bf16",
                                    "out_ptr": f"*{name}", "lam_value": "fp32", "num_splits": "i32"},
                      "constexprs": {"V": 128, "BLOCK_S": 32, "BLOCK_V": tiles["BLOCK_V"], "LAM_FROM_PTR": True},
                      "divisible": ["m_ptr", "l_ptr", "acc_ptr", "out_ptr"],
                      "options": {"num_warps": 4}, "archs": [90]})
    results = gpu_codegen(cases)
    assert [(r["kernel"], r["arch"]) for r in results] == [(c["kernel"], a) for c in cases for a in c["archs"]]
    for r in results:   # the split kernel writes its partials, the reduction reads them, 16 bytes at a time
        assert r["shared"] <= 99 * 1024 and r["st_v4" if r["kernel"] == "_split_kernel" else "ld_v4"] > 0, r
    for r in results[:2]:                                     # bf16 split kernel, sm_80 and sm_90
        assert r["wgmma"] + r["mma_sync"] > 0, r


# ----------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,S", [(1, 32768 - 3), (16, 4096 + 5)])
def test_cuda_bf16_sambay_shapes(B, S):
    """SambaY's shapes (40 q heads, 10 kv pairs, D 64) in bf16, a view of a longer buffer with padding."""
    from sambay.kernels import triton_interpreter

    if triton_interpreter():
        pytest.skip("TRITON_INTERPRET=1 is set; realistic sizes need the compiled kernels")
    Hq, G, D = 40, 10, 64
    q, k, v, valid = _inputs(B, Hq, G, S + 100, D, p_invisible=0.1, dtype=torch.bfloat16, device="cuda")
    k, v, valid = k[:, :, :, :S], v[:, :, :S], valid[:, :S]
    lam = torch.tensor(0.3, device="cuda", dtype=torch.bfloat16)
    out = diff_decode(q, k, v, valid, lam, D ** -0.5)
    _judge_low_precision(out, q, k, v, valid, lam, D ** -0.5)
    assert math.isfinite(out.float().abs().max().item())


@pytest.mark.slow
@pytest.mark.triton
def test_model_decode_through_the_kernel_equals_the_twin(interp_device, monkeypatch):
    """The model's decode steps (sliding ring, shared K/V, cross layers; dynamic and static) with the decode
    family sent to the kernel (as "auto" does on CUDA) equal the same steps on the twins."""
    from helpers import random_model

    ddt = importlib.import_module("sambay.kernels.diff_decode.triton_diff_decode")
    calls = []
    real_kernel = ddt.diff_decode_triton
    monkeypatch.setattr(ddt, "diff_decode_triton", lambda *a, **kw: calls.append(1) or real_kernel(*a, **kw))
    model = random_model(sliding_window=4)
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :2] = 0

    def decode(static):
        cache = model.allocate_cache(2, 12)
        out = [model(ids[:, :5], mask[:, :5], cache=cache, logits_to_keep=1).logits]
        out += [model(ids[:, t:t + 1], cache=cache, static=static).logits for t in range(5, 11)]
        return torch.cat(out, 1)

    with torch.no_grad():
        ref = decode(False)
        monkeypatch.setattr(dd, "fast_kernel", lambda *a, **kw: dd.diff_decode_triton)
        for static in (False, True):
            n = len(calls)
            torch.testing.assert_close(decode(static), ref, rtol=1e-4, atol=1e-5)
            # 6 steps x (2 sliding + 1 full + 1 cross layers), and the prefill's full and cross layers, whose one
            # kept row (logits_to_keep=1, the YOCO skip) is a single query too.
            assert len(calls) - n == 6 * 4 + 2
