"""Differential-attention decode (one query token per sequence) over the cache-layout K/V: the op, its dispatch.

``diff_decode(q, k, v, valid, lam, scale, backend)`` computes, for each differential head j,

    softmax(q_2j k_0g^T * scale) V_g - lam * softmax(q_2j+1 k_1g^T * scale) V_g,     g = j // R

exactly as :func:`sambay.kernels.diff_decode.ref.diff_decode_ref` (the spec and twin) defines it, shapes and the
fully-masked-row convention included. Every implementation has that signature (``valid=None``: all visible):

    spec and twin   diff_decode/ref.py
    CUDA            diff_decode/triton_diff_decode.py (flash-decoding, split over the context)
    CPU             diff_decode/cpu_diff_decode.cpp (fused, K/V read once in their own dtype; built by cpu_native)

One family (``diff_decode``), dispatched once by :func:`fast_kernel`: ``"auto"`` sends CUDA tensors to the Triton
kernel when Triton imports, CPU tensors to the C++ kernel when it is built, everything else to the twin.
:func:`sambay.kernels.diff_attend` asks :func:`fast_kernel` for its decode rows.

This module imports no Triton itself (the kernel module is imported on first use), so importing it is
safe on a machine without Triton and before ``TRITON_INTERPRET`` is set.

:func:`diff_decode_bytes` counts the bytes the Triton kernel moves per call beside the ideal (K and V read once).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from sambay.kernels.common import device_of
from sambay.kernels.diff_decode.ref import check_diff_decode_args, diff_decode_ref
from sambay.kernels.dispatch import check_backend, fast_path, needs_grad

__all__ = ["DiffDecodeBytes", "choose_splits", "diff_decode", "diff_decode_bytes", "diff_decode_cpu",
           "diff_decode_ref", "diff_decode_tiles", "fast_kernel"]

# SMs assumed when no CUDA device is there to ask (the interpreter, or counting bytes on a CPU machine):
# an H100/H200 SXM has 132.
_DEFAULT_SMS = 132
_MIN_SPLIT_BLOCKS = 4

Kernel = Callable[..., torch.Tensor]


def diff_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                lam: torch.Tensor | float, scale: float, backend: str = "auto",
                length: torch.Tensor | None = None) -> torch.Tensor:
    """Differential attention for one query token per sequence. See :func:`diff_decode_ref`.

    Args:
        q: (B, Hq, D); k: (B, 2, G, S, D); v: (B, G, S, 2D), one float dtype, any strides.
        valid: (B, S) bool, True = visible slot; a row with no visible slot gives zeros.
        lam: float or one-element tensor (a tensor is read on the device: no host sync, graph-capturable).
        scale: softmax scale.
        length: None, or a one-element integer tensor on the device: slots from it on are invisible and the
            kernels read none of them (the Triton kernel's grid stays fixed: the static decode step passes
            ``cache.pos + 1`` and stays capturable while reading only the written prefix).
        backend: "auto" (the Triton kernel for CUDA tensors when Triton imports, the C++ kernel for CPU tensors
            when it is built, else the twin), "torch" (the twin), "cuda" (the Triton kernel; on CPU tensors only
            under TRITON_INTERPRET=1, else RuntimeError). The kernels have no backward: a call that needs
            gradients takes the twin under "auto" and raises under "cuda".
    Returns:
        (B, Hq/2, 2D) in q.dtype.
    """
    check_backend(backend)
    check_diff_decode_args(q, k, v, valid, lam, length)
    return (fast_kernel(q, k, v, lam, backend) or diff_decode_ref)(q, k, v, valid, lam, scale, length)


def fast_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor | float,
                backend: str = "auto") -> Kernel | None:
    """The fast path that takes this call (with :func:`diff_decode`'s signature), or None: the family's one
    dispatch. Raises as :func:`sambay.kernels.dispatch.fast_path` does for ``backend="cuda"``."""
    path = fast_path("diff_decode", backend, (q, k, v), lambda p: _unsupported(p, q, k, v, lam))
    return None if path is None else diff_decode_triton if path == "cuda" else diff_decode_cpu


def _unsupported(path: str, q, k, v, lam) -> str | None:
    """Why the ``path`` kernel cannot take this call, or None."""
    if needs_grad(q, k, v, lam):
        return "an input requires grad and the kernel has no backward (call it under torch.no_grad())"
    if path == "cpu":
        if k.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
            return f"q/k/v in {q.dtype}/{k.dtype}/{v.dtype} (the C++ kernel reads bf16, fp16 or fp32)"
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            return "K/V without a unit last stride"
    return None


def diff_decode_triton(q, k, v, valid, lam, scale, length=None) -> torch.Tensor:
    """The Triton kernel (:mod:`.triton_diff_decode`) on q's device; ``valid=None`` means every slot visible;
    ``length`` (a device tensor) stops every split's reads there."""
    from sambay.kernels.diff_decode import triton_diff_decode

    if valid is None:
        valid = torch.ones(k.shape[0], k.shape[-2], dtype=torch.bool, device=k.device)
    with device_of(q):
        return triton_diff_decode.diff_decode_triton(q, k, v, valid, lam, scale, length)


def diff_decode_cpu(q, k, v, valid, lam, scale, length=None, isa: str = "auto") -> torch.Tensor:
    """The C++ kernel (``cpu_diff_decode.cpp``): K/V (bf16, fp16 or fp32, unit last stride) read once in their own
    dtype, the math in fp32, rounded once to q's dtype; ``valid=None`` means every slot visible. The kernel reads
    each sequence up to its last visible slot, so ``length`` is applied to ``valid`` (1 byte a slot). ``isa``:
    "auto" (the widest variant the CPU has: AVX-512, ``cpu_diff_decode_avx512.cpp``, else AVX2), "avx2" or
    "avx512"."""
    B, Hq, D = q.shape
    G = k.shape[2]
    if length is not None:
        kept = torch.arange(k.shape[-2], device=k.device) < length.reshape(())
        valid = kept[None].expand(B, -1) if valid is None else valid & kept
    qg = q.reshape(B, G, Hq // 2 // G, 2, D).transpose(2, 3)  # (B, G, 2, R, D): diff head j = g R + r, map m
    valid = q.new_empty(0, dtype=torch.bool) if valid is None else valid.contiguous()
    lam32 = lam.detach().float().reshape(1) if isinstance(lam, torch.Tensor) else torch.tensor([float(lam)])
    out = torch.ops.sambay_cpu.diff_decode(qg.float().contiguous(), k, v, valid, lam32, float(scale), isa)
    return out.reshape(B, Hq // 2, 2 * D).to(q.dtype)


# ------------------------------------------------------------------------------------- launch geometry
def diff_decode_tiles(D: int, dtype: torch.dtype) -> dict:
    """The kernel's tile sizes for head dim D: BLOCK_N keys per step, BLOCK_D / BLOCK_V the padded widths
    of a K row (D) and a V row (2D). tl.dot needs every dim >= 16 and powers of two."""
    block_d = max(16, 1 << (D - 1).bit_length())
    block_v = max(16, 1 << (2 * D - 1).bit_length())
    # K0 + K1 + V per key row; keep one pipeline stage near 32 KB (two stages fit a 99 KB consumer GPU).
    row_bytes = (2 * block_d + block_v) * dtype.itemsize
    block_n = 64 if row_bytes * 64 <= 32 * 1024 else 32 if row_bytes * 32 <= 32 * 1024 else 16
    if dtype.itemsize >= 4 and block_d >= 64:
        # fp32 dots run on FMA units with register-resident operands: 32 keys at D = 64 spilled on sm_90
        # (sambay.kernels.compile_check); the loads are bandwidth-bound either way.
        block_n = 16
    return {"BLOCK_N": block_n, "BLOCK_D": block_d, "BLOCK_V": block_v}


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device | None) -> int:
    """SM count of a CUDA device, else the default (132, an H100/H200)."""
    if device is not None and device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _DEFAULT_SMS


def choose_splits(B: int, G: int, S: int, block_n: int, sms: int) -> tuple[int, int]:
    """Split the S slots of each (sequence, kv pair) into chunks so about 2 programs per SM run, each
    at least _MIN_SPLIT_BLOCKS blocks long (shorter splits would spend more on their fp32 partials
    than they save: the partials cost about 8 / split_len of the K/V bytes at D = 64, R = 2).

    Returns (num_splits, split_len) with split_len a multiple of block_n, every split non-empty
    (num_splits = ceil(S / split_len)) and num_splits >= 1 (S = 0 gives one empty split).
    Batch 1 at a long context gets many splits; a large batch gets one split per sequence and pair.
    """
    blocks = -(-S // block_n)
    want = max(1, -(-2 * sms // max(1, B * G)))
    splits = max(1, min(want, blocks // _MIN_SPLIT_BLOCKS))
    split_len = max(1, -(-blocks // splits)) * block_n
    return max(1, -(-S // split_len)), split_len


# --------------------------------------------------------------------------------------- byte counting
class DiffDecodeBytes(NamedTuple):
    """Bytes one diff_decode kernel call moves (assuming every slot visible: invisible slots are not
    loaded, so a masked call moves less), and the ideal: K and V read once, q read once, out written."""

    kernel: int
    ideal: int
    num_splits: int


def diff_decode_bytes(B: int, Hq: int, G: int, S: int, D: int, dtype: torch.dtype,
                      num_splits: int | None = None, device: torch.device | None = None,
                      length: int | None = None) -> DiffDecodeBytes:
    """Count the bytes of one Triton diff_decode call (split kernel + reduction kernel) and the ideal.
    ``length``: the call's used length (the static step's pos + 1 in an S-slot cache): slots from it on are not
    read; the partials and q are still per split (the grid is that of the whole cache).

    kernel = K + V (each read once: every split program reads its own slot range of one kv pair for all
    its query heads) + q (read once per split) + valid (1 byte per slot) + the fp32 partials (max, sum
    and a 2D-wide accumulator per split, map and diff head; written once and read once) + out.
    ideal = K + V + q + out. num_splits: as the launcher would choose on ``device`` (default: 132 SMs).
    """
    item = dtype.itemsize
    if num_splits is None:
        num_splits, _ = choose_splits(B, G, S, diff_decode_tiles(D, dtype)["BLOCK_N"], num_sms(device))
    used = S if length is None else max(0, min(S, length))
    kv = B * G * used * (2 * D + 2 * D) * item                   # two K stripes of D, one V of 2D per slot
    q_bytes = B * Hq * D * item
    out = B * (Hq // 2) * 2 * D * item
    partials = B * (Hq // 2) * 2 * num_splits * (2 + 2 * D) * 4  # (m, l, acc[2D]) fp32 per map and split
    kernel = kv + q_bytes * num_splits + B * used + 2 * partials + out
    return DiffDecodeBytes(kernel=kernel, ideal=kv + q_bytes + out, num_splits=num_splits)
