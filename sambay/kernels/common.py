"""Small helpers every op folder shares: the accumulation dtype and the device a launch runs on."""

from __future__ import annotations

import contextlib

import torch


def f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 for accumulation; fp64 stays fp64 (gradcheck runs the model in fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def device_of(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (a model on cuda:1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


_VECTOR_BYTES = 16


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is unit-stride and its base and row strides are multiples of 16 bytes
    (the kernels' vector loads), else a fresh contiguous copy.

    The conv output continues a history, so the scan input is usually a view 3 elements into its storage; the
    scan kernel loads rows as 16-byte vectors when T is a multiple of its block (selective_scan_fwd_kernel.cuh
    :315) and upstream only copies when stride(-1) != 1, so a misaligned view would fault ("misaligned address").
    """
    es = t.element_size()
    ok = (t.stride(-1) == 1 or t.shape[-1] == 1) and t.data_ptr() % _VECTOR_BYTES == 0 and all(
        size <= 1 or stride * es % _VECTOR_BYTES == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]))
    return t if ok else t.clone(memory_format=torch.contiguous_format)
