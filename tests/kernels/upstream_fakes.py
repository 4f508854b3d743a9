"""Strict CPU stand-ins for the three compiled CUDA extensions sambay's CUDA adapters reach.

The upstream packages mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0 and flash-attn 2.8.3.post2 install
Python-only on a CPU machine (``*_SKIP_CUDA_BUILD=TRUE *_FORCE_BUILD=TRUE pip install --no-build-isolation
--no-deps``); importing them then fails only at the compiled modules ``selective_scan_cuda``,
``causal_conv1d_cuda`` and ``flash_attn_2_cuda``. :func:`install` puts the modules below in their place, so the
upstream Python wrappers, autograd functions and ``torch.library`` custom ops run for real, and upstream's
Triton ``selective_state_update`` runs under Triton's interpreter.

Each stand-in first enforces the C++ checks of the real extension that sambay's calls could violate, each
citing its upstream file and line at those versions (the sdists' ``csrc/``), and raises ``RuntimeError`` like
``TORCH_CHECK`` does; then it computes the result with plain fp32 PyTorch, as the kernel does. The checks
that need a GPU (``x.is_cuda()``, the compute capability) are the ones deliberately left out: the tests run
the CUDA adapters on CPU tensors. Where a kernel switches to 16-byte vector loads, the stand-in checks the
pointer alignment under the same condition the launcher uses, since a misaligned vector load is a CUDA
fault ("misaligned address") that kills the process's CUDA context.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F

PACKAGES = {"mamba_ssm": "2.3.2.post1", "causal_conv1d": "1.7.0", "flash_attn": "2.8.3.post2"}

SS = "mamba csrc/selective_scan/selective_scan.cpp"
SSK = "mamba csrc/selective_scan/selective_scan_fwd_kernel.cuh"
SSC = "mamba csrc/selective_scan/selective_scan_common.h"
CC = "causal-conv1d csrc/causal_conv1d.cpp"
CCF = "causal-conv1d csrc/causal_conv1d_fwd.cu"
FA = "flash-attention csrc/flash_attn/flash_api.cpp"

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# How often each stand-in (and upstream's Triton selective_state_update, see count_state_update) ran: the
# tests assert the fast paths were really taken, not silently replaced by the twins.
CALLS: collections.Counter = collections.Counter()


def check(cond: bool, where: str, what: str) -> None:
    """TORCH_CHECK: raise RuntimeError naming the upstream check that failed."""
    if not cond:
        raise RuntimeError(f"upstream check failed [{where}]: {what}")


def check_shape(t: torch.Tensor, shape: tuple, where: str, name: str) -> None:
    check(tuple(t.shape) == tuple(shape), where, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_vector_aligned(t: torch.Tensor, row_dims: tuple[int, ...], vec_bytes: int, where: str, name: str) -> None:
    """A kernel that loads ``vec_bytes`` at a time from the start of each row (row = one index of ``row_dims``)
    needs the base pointer and every row stride in ``row_dims`` to be multiples of ``vec_bytes``."""
    es = t.element_size()
    check(t.data_ptr() % vec_bytes == 0, where,
          f"{name}: {vec_bytes}-byte vector loads from a pointer at offset {t.data_ptr() % vec_bytes} "
          f"(misaligned address)")
    for d in row_dims:
        if t.shape[d] > 1:
            check(t.stride(d) * es % vec_bytes == 0, where,
                  f"{name}: {vec_bytes}-byte vector loads with stride({d}) = {t.stride(d)} elements "
                  f"(misaligned address)")


# ---------------------------------------------------------------------------------- selective_scan_cuda
def _scan_launch(seqlen: int) -> tuple[int, int]:
    """(kNThreads, kNItems) as selective_scan_fwd_cuda picks them (selective_scan_fwd_kernel.cuh:354-364)."""
    if seqlen <= 128:
        return 32, 4
    if seqlen <= 256:
        return 32, 8
    if seqlen <= 512:
        return 32, 16
    if seqlen <= 1024:
        return 64, 16
    return 128, 16


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """``selective_scan_cuda.fwd`` (selective_scan.cpp:227). u, delta, z (b, d, l); A (d, n); B, C (b, g, n, l)."""
    CALLS["selective_scan_fwd"] += 1
    itype = u.dtype
    check(itype in _FLOATS, f"{SS}:235", f"u dtype must be fp32/fp16/bf16, got {itype}")
    check(A.dtype == torch.float32, f"{SS}:236", f"A dtype must be fp32 (real weights), got {A.dtype}")
    check(B.dim() >= 3 and C.dim() >= 3, f"{SS}:238", "sambay passes input-dependent (variable) B and C")
    check(delta.dtype == itype, f"{SS}:242", f"delta dtype must equal u's ({itype}), got {delta.dtype}")
    check(B.dtype == itype, f"{SS}:243", f"variable B dtype must equal u's ({itype}), got {B.dtype}")
    check(C.dtype == itype, f"{SS}:244", f"variable C dtype must equal u's ({itype}), got {C.dtype}")
    check(u.stride(-1) == 1 or u.size(-1) == 1, f"{SS}:252", "u.stride(-1) must be 1")
    check(delta.stride(-1) == 1 or delta.size(-1) == 1, f"{SS}:253", "delta.stride(-1) must be 1")
    b, d, L = u.shape
    n, g = A.size(1), B.size(1)
    check(n <= 256, f"{SS}:262", "state dimension <= 256")
    check_shape(u, (b, d, L), f"{SS}:264", "u")
    check_shape(delta, (b, d, L), f"{SS}:265", "delta")
    check_shape(A, (d, n), f"{SS}:266", "A")
    check_shape(B, (b, g, n, L), f"{SS}:270", "B")
    check(B.stride(-1) == 1 or B.size(-1) == 1, f"{SS}:271", "B.stride(-1) must be 1")
    check_shape(C, (b, g, n, L), f"{SS}:276", "C")
    check(C.stride(-1) == 1 or C.size(-1) == 1, f"{SS}:277", "C.stride(-1) must be 1")
    if D is not None:
        check(D.dtype == torch.float32, f"{SS}:282", f"D dtype must be fp32, got {D.dtype}")
        check(D.stride(-1) == 1 or D.size(-1) == 1, f"{SS}:284", "D.stride(-1) must be 1")
        check_shape(D, (d,), f"{SS}:285", "D")
    if delta_bias is not None:
        check(delta_bias.dtype == torch.float32, f"{SS}:290", f"delta_bias dtype must be fp32, got {delta_bias.dtype}")
        check(delta_bias.stride(-1) == 1 or delta_bias.size(-1) == 1, f"{SS}:292", "delta_bias.stride(-1) must be 1")
        check_shape(delta_bias, (d,), f"{SS}:293", "delta_bias")
    if z is not None:
        check(z.dtype == itype, f"{SS}:300", f"z dtype must equal u's ({itype}), got {z.dtype}")
        check(z.stride(-1) == 1 or z.size(-1) == 1, f"{SS}:302", "z.stride(-1) must be 1")
        check_shape(z, (b, d, L), f"{SS}:303", "z")
    # kIsEvenLen (selective_scan_fwd_kernel.cuh:315): the whole sequence is a multiple of the block's chunk, and
    # then u, delta, z, out are loaded/stored (selective_scan_common.h:183-193, load_input) and B, C loaded
    # (selective_scan_common.h:207-213, load_weight) as vec_t of sizeof(input_t) * kNElts bytes
    # (selective_scan_fwd_kernel.cuh:36-49), from row starts u + b * batch_stride + d * d_stride.
    threads, items = _scan_launch(L)
    out = torch.empty_like(delta)  # selective_scan.cpp:311
    out_z = torch.empty_like(z) if z is not None else None  # selective_scan.cpp:304
    if L % (threads * items) == 0:
        es = u.element_size()
        vec = es * (4 if es == 4 else min(8, items))
        where = f"{SSK}:315 kIsEvenLen (seqlen {L} % {threads * items} == 0) -> {SSC}:187"
        for name, t in (("u", u), ("delta", delta), ("out", out)):
            check_vector_aligned(t, (0, 1), vec, where, name)
        for name, t in (("B", B), ("C", C)):
            check_vector_aligned(t, (0, 1, 2), vec, f"{SSK}:315 kIsEvenLen -> {SSC}:210", name)
        if z is not None:
            check_vector_aligned(z, (0, 1), vec, where, "z")
            check_vector_aligned(out_z, (0, 1), vec, where, "out_z")

    # The kernel's math (fp32 registers): delta += delta_bias, softplus with threshold 20
    # (selective_scan_fwd_kernel.cuh, delta_softplus), then the recurrence over l.
    dt = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0.0)
    if delta_softplus:
        dt = torch.where(dt <= 20.0, torch.log1p(torch.exp(dt)), dt)
    uf, Bf, Cf = u.float(), B.float(), C.float()
    Bf = Bf.repeat_interleave(d // g, dim=1)  # (b, d, n, l): group -> channels
    Cf = Cf.repeat_interleave(d // g, dim=1)
    s = torch.zeros(b, d, n)
    ys = []
    for t in range(L):
        s = torch.exp(dt[:, :, t, None] * A) * s + (dt[:, :, t] * uf[:, :, t])[..., None] * Bf[..., t]
        ys.append((s * Cf[..., t]).sum(-1))
    y = torch.stack(ys, -1) if ys else uf.new_zeros(b, d, 0)
    if D is not None:
        y = y + uf * D[:, None]
    out.copy_(y)
    # x: the per-chunk scan states (b, d, n_chunks, 2n); selective_scan_interface.py reads the last state from
    # x[:, :, -1, 1::2]. Only that slot is meaningful here; the rest is NaN so that any other use shows.
    n_chunks = (L + 2047) // 2048
    x = torch.full((b, d, max(n_chunks, 1), 2 * n), float("nan"))  # selective_scan.cpp:313
    x[:, :, -1, 1::2] = s
    result = [out, x]
    if z is not None:
        out_z.copy_(y * F.silu(z.float()))
        result.append(out_z)
    return result


def _selective_scan_bwd(*args, **kwargs):
    raise NotImplementedError("the selective_scan_cuda stand-in implements the forward only")


# ----------------------------------------------------------------------------------- causal_conv1d_cuda
def _conv_common(x, weight, bias, line_dtype: int, line_width: int, line_bias: int):
    check(x.dtype in _FLOATS, f"{CC}:{line_dtype}", f"x dtype must be fp32/fp16/bf16, got {x.dtype}")
    check(weight.dtype in _FLOATS, f"{CC}:{line_dtype + 1}", f"weight dtype must be fp32/fp16/bf16, got {weight.dtype}")
    b, d, L = x.shape
    width = weight.size(-1)
    check_shape(weight, (d, width), f"{CC}:{line_width - 9}", "weight")
    check(2 <= width <= 4, f"{CC}:{line_width}", "causal_conv1d only supports width between 2 and 4")
    if bias is not None:
        check(bias.dtype == weight.dtype, f"{CC}:{line_bias}", f"bias dtype must equal weight's ({weight.dtype}), "
              f"got {bias.dtype}")
        check(bias.stride(-1) == 1, f"{CC}:{line_bias + 2}", "bias.stride(-1) must be 1")
        check_shape(bias, (d,), f"{CC}:{line_bias + 3}", "bias")
    return b, d, L, width


def _conv_math(window: torch.Tensor, weight: torch.Tensor, bias, silu: bool) -> torch.Tensor:
    """window (b, d, L + width - 1) -> (b, d, L) in fp32, as the kernels accumulate (float(x) * float(w))."""
    width = weight.size(-1)
    L = window.size(-1) - (width - 1)
    w = weight.float()
    acc = torch.zeros(window.shape[0], window.shape[1], L)
    for k in range(width):
        acc = acc + w[:, k, None] * window[:, :, k:k + L].float()
    if bias is not None:
        acc = acc + bias.float()[:, None]
    return F.silu(acc) if silu else acc


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu_activation):
    """``causal_conv1d_cuda.causal_conv1d_fwd`` (causal_conv1d.cpp:150). x (b, d, l), weight (d, w), out like x."""
    CALLS["causal_conv1d_fwd"] += 1
    b, d, L, width = _conv_common(x, weight, bias, 160, 182, 186)
    check_shape(x, (b, d, L), f"{CC}:172", "x")
    check(x.stride(2) == 1 or x.stride(1) == 1, f"{CC}:175", "x must be unit-stride along l or d")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        check(d % 8 == 0, f"{CC}:179", "channel-last layout needs dim % 8 == 0")
        check(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, f"{CC}:180", "channel-last strides must be multiples of 8")
    check(seq_idx is None, f"{CC}:193", "sambay passes no seq_idx")
    if initial_states is not None:
        check(channel_last, f"{CC}:213", "initial_states is only supported for channel last layout")
    if final_states_out is not None:
        check(channel_last, f"{CC}:228", "final_states is only supported for channel last layout")
    if not channel_last:
        # kIsVecLoad (causal_conv1d_fwd.cu:142) when seqlen % kNElts == 0 (kNElts: 4 for fp32, 8 for 16-bit,
        # causal_conv1d_fwd.cu:141): x and out rows (x + b * batch_stride + c * c_stride, :68-69) move as 16 bytes.
        kn = 4 if x.element_size() == 4 else 8
        if L % kn == 0:
            where = f"{CCF}:142 kIsVecLoad (seqlen {L} % {kn} == 0) -> {CCF}:90"
            check_vector_aligned(x, (0, 1), 16, where, "x")
            check_vector_aligned(out, (0, 1), 16, where, "out")
    window = F.pad(x.float(), (width - 1, 0)) if initial_states is None else torch.cat(
        [initial_states.float(), x.float()], -1)
    out.copy_(_conv_math(window, weight, bias, silu_activation))
    if final_states_out is not None:
        final_states_out.copy_(window[:, :, -(width - 1):])


def causal_conv1d_update(x, conv_state, weight, bias, out, silu_activation, cache_seqlens, conv_state_indices):
    """``causal_conv1d_cuda.causal_conv1d_update`` (causal_conv1d.cpp:468). x (b, d, l); conv_state (b, d, s)."""
    CALLS["causal_conv1d_update"] += 1
    check(conv_state.dtype == x.dtype, f"{CC}:479", f"conv_state dtype must equal x's ({x.dtype}), "
          f"got {conv_state.dtype}")
    b, d, L, width = _conv_common(x, weight, bias, 477, 496, 500)
    state_len = conv_state.size(2)
    check(state_len >= width - 1, f"{CC}:491", f"conv_state length {state_len} must be >= width - 1 = {width - 1}")
    check_shape(x, (b, d, L), f"{CC}:493", "x")
    check(conv_state_indices is None and cache_seqlens is None, f"{CC}:517", "sambay passes no indices/seqlens")
    check_shape(conv_state, (b, d, state_len), f"{CC}:529", "conv_state")
    window = torch.cat([conv_state.float(), x.float()], -1)[:, :, -(width - 1 + L):]
    out.copy_(_conv_math(window, weight, bias, silu_activation))
    conv_state.copy_(torch.cat([conv_state, x], -1)[:, :, -state_len:])  # shift left by l, new inputs last


def _conv_bwd(*args, **kwargs):
    raise NotImplementedError("the causal_conv1d_cuda stand-in implements the forward only")


# ------------------------------------------------------------------------------------- flash_attn_2_cuda
def flash_fwd(q, k, v, out_, alibi_slopes, p_dropout, softmax_scale, is_causal, window_left, window_right,
              softcap, return_softmax, gen):
    """``flash_attn_2_cuda.fwd`` = mha_fwd (flash_api.cpp:351). q (b, sq, h, d); k, v (b, sk, hk, d)."""
    CALLS["flash_fwd"] += 1
    check(q.dtype in (torch.float16, torch.bfloat16), f"{FA}:373", f"FlashAttention only supports fp16 and bf16, "
          f"got {q.dtype}")
    check(k.dtype == q.dtype, f"{FA}:375", "query and key must have the same dtype")
    check(v.dtype == q.dtype, f"{FA}:376", "query and value must have the same dtype")
    for name, t, line in (("q", q, 380), ("k", k, 381), ("v", v, 382)):
        check(t.stride(-1) == 1, f"{FA}:{line}", f"{name} must have contiguous last dimension")
    b, sq, h, dh = q.shape
    sk, hk = k.size(1), k.size(2)
    check(b > 0, f"{FA}:392", "batch size must be positive")
    check(dh <= 256, f"{FA}:393", "head dimension at most 256")
    check(dh % 8 == 0, f"{FA}:394", "head_size must be a multiple of 8")
    check(h % hk == 0, f"{FA}:395", "number of heads in key/value must divide number of heads in query")
    check(alibi_slopes is None and out_ is None and softcap == 0.0, f"{FA}:355", "sambay passes no alibi/out/softcap")
    check(p_dropout == 0.0 and not return_softmax, f"{FA}:445", "the stand-in implements inference (no dropout)")
    if window_left >= sk:  # flash_api.cpp:399-404
        window_left = -1
    if window_right >= sk:
        window_right = -1
    if sq == 1:
        is_causal = False
    if is_causal:
        window_right = 0
    check_shape(q, (b, sq, h, dh), f"{FA}:416", "q")
    check_shape(k, (b, sk, hk, dh), f"{FA}:417", "k")
    check_shape(v, (b, sk, hk, dh), f"{FA}:418", "v (FA2 needs the value head dim equal to q/k's)")
    # Visibility, bottom-right aligned (flash_attn_interface.py flash_attn_func docstring): query i sees key j iff
    # i + sk - sq - window_left <= j <= i + sk - sq + window_right (a -1 window is unlimited on that side).
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if window_right >= 0:
        vis &= j <= i + window_right
    if window_left >= 0:
        vis &= j >= i - window_left
    r = h // hk
    qf = q.float().transpose(1, 2)  # (b, h, sq, d)
    kf = k.float().transpose(1, 2).repeat_interleave(r, dim=1)  # consecutive GQA: head i reads kv head i // r
    vf = v.float().transpose(1, 2).repeat_interleave(r, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * softmax_scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)  # (b, h, sq)
    o = torch.softmax(s, -1).nan_to_num(0.0) @ vf  # a row that sees nothing is 0, as the kernel writes
    out = o.transpose(1, 2).to(q.dtype)
    return [out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)]


def _flash_other(*args, **kwargs):
    raise NotImplementedError("the flash_attn_2_cuda stand-in implements fwd only")


# ------------------------------------------------------------------------------------------------ install
def cpu_device_context(monkeypatch) -> None:
    """``torch.cuda.device(i)`` for a CPU tensor's ``device.index`` (None) fails on a CPU-only torch; upstream's
    ``selective_state_update`` enters it around the launch (selective_state_update.py:200). On CPU tensors it is
    made a no-op; any real CUDA index still goes to torch."""
    real = torch.cuda.device

    def device(idx):
        return contextlib.nullcontext() if idx is None else real(idx)
    monkeypatch.setattr(torch.cuda, "device", device)


def count_state_update(monkeypatch) -> None:
    """Count the calls of upstream's Triton selective_state_update (it runs for real, under the interpreter)."""
    import mamba_ssm.ops.triton.selective_state_update as ssu

    real = ssu.selective_state_update

    def counted(*args, **kwargs):
        CALLS["selective_state_update"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(ssu, "selective_state_update", counted)


def missing() -> list[str]:
    """The upstream packages (at the pinned versions) that are not installed."""
    out = []
    for pkg, version in PACKAGES.items():
        spec = importlib.util.find_spec(pkg)
        if spec is None:
            out.append(f"{pkg}=={version}")
    return out


def _module(name: str, **fns) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(fns)
    m.__stand_in__ = True
    return m


def install() -> None:
    """Put the stand-ins into ``sys.modules`` (before upstream is imported), import upstream, and register CPU
    kernels for flash-attn's CUDA-only custom ops by reusing upstream's own Python body (``_init_fn``)."""
    stand_ins = {
        "selective_scan_cuda": _module("selective_scan_cuda", fwd=selective_scan_fwd, bwd=_selective_scan_bwd),
        "causal_conv1d_cuda": _module("causal_conv1d_cuda", causal_conv1d_fwd=causal_conv1d_fwd,
                                      causal_conv1d_bwd=_conv_bwd, causal_conv1d_update=causal_conv1d_update),
        "flash_attn_2_cuda": _module("flash_attn_2_cuda", fwd=flash_fwd, varlen_fwd=_flash_other,
                                     bwd=_flash_other, varlen_bwd=_flash_other, fwd_kvcache=_flash_other),
    }
    for name, mod in stand_ins.items():
        existing = sys.modules.get(name)
        if existing is not None and not getattr(existing, "__stand_in__", False):
            raise RuntimeError(f"{name} is the real compiled extension; the CPU contract tests need its stand-in")
        sys.modules.setdefault(name, mod)
    import causal_conv1d  # noqa: F401
    import flash_attn.flash_attn_interface as fai
    import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    import mamba_ssm.ops.triton.selective_state_update  # noqa: F401

    op = fai._flash_attn_forward  # @custom_op(..., device_types="cuda"): give it upstream's body on CPU too
    if "cpu" not in getattr(op, "_backend_fns", {}):
        op.register_kernel("cpu")(op._init_fn)
