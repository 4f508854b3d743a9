"""Triton kernel for the SwiGLU-style gate ``silu(gate) * value`` (forward and backward).

Twin: :func:`sambay.kernels.gating.ref.silu_mul_ref`. Both compute in fp32 (fp64 when an input is fp64,
for gradcheck) and round once to ``gate.dtype``; the only numerical difference is the ``exp``
implementation, so results agree to a few fp32 ulps, i.e. at most one ulp after rounding to bf16/fp16.

Layout: the op is elementwise over ``(..., C)``. The kernel sees the leading dims as *rows* and the last
dim as unit-stride *columns*. Leading dims are collapsed by stride math into at most two row levels,
``row = i * D1 + j`` with offset ``i * s0 + j * s1``, so the common strided cases run without a copy:
the halves ``u[..., :C]`` / ``u[..., C:]`` of a fused ``(..., 2C)`` projection, sliced or transposed
batch/time dims, and leading dims expanded with stride 0. The output is always a fresh contiguous tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["silu_mul_triton"]


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _row_offsets(rows, D1, s0, s1, TWO_LEVELS: tl.constexpr):
    """Element offset of each row: ``(r // D1) * s0 + (r % D1) * s1``; one level (the common case, e.g.
    fused halves) skips the 64-bit division."""
    if TWO_LEVELS:
        outer = rows // D1
        return outer * s0 + (rows - outer * D1) * s1
    return rows * s1


@triton.jit
def _silu_mul_fwd_kernel(
    gate_ptr, value_ptr, out_ptr,
    R, C, D1,                    # rows (= D0 * D1), columns, size of the inner row level
    g_s0, g_s1, v_s0, v_s1,      # element strides of the outer/inner row level for gate and value
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TWO_LEVELS: tl.constexpr, ACC: tl.constexpr,
):
    """out[r, c] = silu(gate[r, c]) * value[r, c]; gate/value (R, C) via row strides, out (R, C) contiguous.
    ACC is the math dtype: fp32, or fp64 when an input is fp64 (the twin keeps fp64 for gradcheck)."""
    # int64 row indices: R * row_stride can exceed 2**31 for long prefill batches.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    g_offs = _row_offsets(rows, D1, g_s0, g_s1, TWO_LEVELS)[:, None] + cols[None, :]
    v_offs = _row_offsets(rows, D1, v_s0, v_s1, TWO_LEVELS)[:, None] + cols[None, :]
    g = tl.load(gate_ptr + g_offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(value_ptr + v_offs, mask=mask, other=0.0).to(ACC)

    # Same formula as PyTorch's silu kernel (x / (1 + exp(-x))) so fp32 results match to the exp's ulp.
    out = g / (1.0 + tl.exp(-g)) * v
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(
    grad_ptr, gate_ptr, value_ptr, dgate_ptr, dvalue_ptr,
    R, C, D1,
    d_s0, d_s1, g_s0, g_s1, v_s0, v_s1,     # row-level strides of grad, gate, value
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TWO_LEVELS: tl.constexpr, ACC: tl.constexpr,
    NEED_DGATE: tl.constexpr, NEED_DVALUE: tl.constexpr,
):
    """dgate = grad * value * dsilu(gate), dvalue = grad * silu(gate); both (R, C) contiguous, ACC math."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    d_offs = _row_offsets(rows, D1, d_s0, d_s1, TWO_LEVELS)[:, None] + cols[None, :]
    g_offs = _row_offsets(rows, D1, g_s0, g_s1, TWO_LEVELS)[:, None] + cols[None, :]
    o_offs = rows[:, None] * C + cols[None, :]
    dy = tl.load(grad_ptr + d_offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(gate_ptr + g_offs, mask=mask, other=0.0).to(ACC)
    sig = 1.0 / (1.0 + tl.exp(-g))
    if NEED_DGATE:
        v_offs = _row_offsets(rows, D1, v_s0, v_s1, TWO_LEVELS)[:, None] + cols[None, :]
        v = tl.load(value_ptr + v_offs, mask=mask, other=0.0).to(ACC)
        # d/dg [g * sigmoid(g)] = sigmoid(g) * (1 + g * (1 - sigmoid(g))), PyTorch's silu_backward form.
        dg = dy * v * (sig * (1.0 + g * (1.0 - sig)))
        tl.store(dgate_ptr + o_offs, dg.to(dgate_ptr.dtype.element_ty), mask=mask)
    if NEED_DVALUE:
        dv = dy * (g * sig)
        tl.store(dvalue_ptr + o_offs, dv.to(dvalue_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def _row_layout(shape: tuple[int, ...], *tensors: torch.Tensor) -> tuple[int, int, list[tuple[int, int]]] | None:
    """Express the leading dims ``shape[:-1]`` of every tensor as two row levels ``(D0, D1)``.

    Returns ``(D0, D1, [(s0, s1) per tensor])`` such that row ``r = i * D1 + j`` of tensor ``t`` starts at
    element offset ``i * s0 + j * s1``, or ``None`` when it cannot (more than two non-mergeable levels).
    Adjacent dims merge when every tensor's outer stride equals its inner stride times the inner size.
    """
    strides = [t.stride()[:-1] for t in tensors]
    levels: list[tuple[int, list[int]]] = []           # (size, [stride per tensor]), outermost first
    for d, size in enumerate(shape[:-1]):
        if size == 1:                                  # size-1 dims never move the pointer
            continue
        ss = [s[d] for s in strides]
        if levels and all(ps == s * size for ps, s in zip(levels[-1][1], ss)):
            levels[-1] = (levels[-1][0] * size, ss)
        else:
            levels.append((size, ss))
    if len(levels) > 2:
        return None
    while len(levels) < 2:
        levels.insert(0, (1, [0] * len(tensors)))
    (d0, outer), (d1, inner) = levels
    return d0, d1, list(zip(outer, inner))


def _as_rows(shape: tuple[int, ...], tensors: list[torch.Tensor]
             ) -> tuple[list[torch.Tensor], int, int, list[tuple[int, int]]]:
    """Make the tensors row-addressable for the kernels: returns (tensors, D0, D1, [(s0, s1)]).

    A tensor is copied only when it truly cannot be addressed as rows: its last dim is not unit-stride
    (e.g. a transposed last dim, or a grad expanded with stride 0 from ``.sum()``), or the leading dims of
    all tensors together do not collapse into two row levels (e.g. a permutation of three leading dims);
    then non-contiguous tensors are copied one at a time until they do.
    """
    tensors = [t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in tensors]
    layout = _row_layout(shape, *tensors)
    for i, t in enumerate(tensors):
        if layout is not None:
            break
        if not t.is_contiguous():
            tensors[i] = t.contiguous()
            layout = _row_layout(shape, *tensors)
    d0, d1, strides = layout
    return tensors, d0, d1, strides


def _silu_mul_config(C: int, block_r: int | None, block_c: int | None) -> tuple[int, int, int]:
    """Tile (BLOCK_R, BLOCK_C) and num_warps: ~4096 elements per program for a memory-bound op."""
    if block_c is None:
        block_c = min(triton.next_power_of_2(max(C, 1)), 1024)
    if block_r is None:
        block_r = max(1, 4096 // block_c)
    num_warps = 8 if block_r * block_c >= 4096 else 4
    return block_r, block_c, num_warps


def _acc_dtype(*tensors: torch.Tensor):
    """The kernels' math dtype: fp32, or fp64 if any input is fp64 (as the twin's ``f32`` upcast does)."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _silu_mul_fwd(gate: torch.Tensor, value: torch.Tensor, *, block_r: int | None = None,
                  block_c: int | None = None) -> torch.Tensor:
    """gate, value: (..., C), at least 1-d, unit last stride preferred; returns (..., C) contiguous in
    gate.dtype. ``block_r``/``block_c`` override the tile (tests use small tiles to cross tile edges)."""
    shape = tuple(gate.shape)
    out = torch.empty(shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    C = shape[-1]
    R = out.numel() // C
    (gate, value), d0, d1, ((g_s0, g_s1), (v_s0, v_s1)) = _as_rows(shape, [gate, value])
    BLOCK_R, BLOCK_C, num_warps = _silu_mul_config(C, block_r, block_c)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _silu_mul_fwd_kernel[grid](gate, value, out, R, C, d1, g_s0, g_s1, v_s0, v_s1,
                               BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, TWO_LEVELS=d0 > 1,
                               ACC=_acc_dtype(gate, value), num_warps=num_warps)
    return out


def _silu_mul_bwd(grad: torch.Tensor, gate: torch.Tensor, value: torch.Tensor, need_dgate: bool = True,
                  need_dvalue: bool = True, *, block_r: int | None = None, block_c: int | None = None,
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad, gate, value: (..., C). Returns (dgate in gate.dtype, dvalue in value.dtype), contiguous;
    a gradient that is not needed is returned as None and never computed."""
    shape = tuple(gate.shape)
    dgate = torch.empty(shape, dtype=gate.dtype, device=gate.device) if need_dgate else None
    dvalue = torch.empty(shape, dtype=value.dtype, device=value.device) if need_dvalue else None
    if gate.numel() == 0 or not (need_dgate or need_dvalue):
        return dgate, dvalue
    C = shape[-1]
    R = gate.numel() // C
    (grad, gate, value), d0, d1, ((d_s0, d_s1), (g_s0, g_s1), (v_s0, v_s1)) = _as_rows(shape,
                                                                                    [grad, gate, value])
    BLOCK_R, BLOCK_C, num_warps = _silu_mul_config(C, block_r, block_c)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
    # An unneeded output gets a stand-in pointer; the constexpr flag removes its store entirely.
    _silu_mul_bwd_kernel[grid](grad, gate, value,
                               dgate if need_dgate else dvalue, dvalue if need_dvalue else dgate,
                               R, C, d1, d_s0, d_s1, g_s0, g_s1, v_s0, v_s1,
                               BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, TWO_LEVELS=d0 > 1,
                               ACC=_acc_dtype(grad, gate, value),
                               NEED_DGATE=need_dgate,
                               NEED_DVALUE=need_dvalue, num_warps=num_warps)
    return dgate, dvalue


# ------------------------------------------------------------------------------------------ autograd glue
class _SiluMulFunction(torch.autograd.Function):
    """Saves the (possibly strided) inputs, not the output: backward recomputes silu from gate."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, value)
        return _silu_mul_fwd(gate, value)

    @staticmethod
    @once_differentiable          # the backward is a Triton kernel: no double backward through it
    def backward(ctx, grad: torch.Tensor):
        gate, value = ctx.saved_tensors
        need_dgate, need_dvalue = ctx.needs_input_grad[:2]
        return _silu_mul_bwd(grad, gate, value, need_dgate, need_dvalue)


# ------------------------------------------------------------------------------------------------ public
def silu_mul_triton(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """silu(gate) * value with one Triton kernel (and one for its backward).

    Args:
        gate: (..., C) float32/bfloat16/float16 (float64 too, computed in fp64); may be a row-strided
            view such as ``u[..., :C]``.
        value: (..., C), same shape and device; float32 or gate's dtype (any float dtype works).
    Returns:
        (..., C) contiguous, in ``gate.dtype``; computed in fp32 and rounded once.
    """
    if gate.shape != value.shape:
        raise ValueError(f"silu_mul: gate and value must have the same shape, got {tuple(gate.shape)} "
                         f"and {tuple(value.shape)}")
    if gate.device != value.device:
        raise ValueError(f"silu_mul: gate and value must be on one device, got {gate.device} and {value.device}")
    if not (gate.is_floating_point() and value.is_floating_point()):
        raise ValueError(f"silu_mul: expected floating-point tensors, got {gate.dtype} and {value.dtype}")
    if gate.dim() == 0:                 # the kernels index (rows, C); a scalar is one row of one column
        return _SiluMulFunction.apply(gate.reshape(1), value.reshape(1)).reshape(())
    return _SiluMulFunction.apply(gate, value)
