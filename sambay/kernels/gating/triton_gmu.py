"""Triton kernels for the Gated Memory Unit's gate ``silu(x @ W^T) * memory`` (forward and backward).

Twin: :func:`sambay.kernels.gating.ref.gmu_ref`. The forward is one tiled matmul whose epilogue applies the
gate, so the in_proj output ``h = x @ W^T`` (M x E) never goes to memory: it lives in fp32 registers,
is gated in fp32 and rounded once. (The twin rounds ``h`` to the input dtype first, as ``nn.Linear``
does, so in bf16 the kernel is slightly *closer* to the fp32 math than the twin; in fp32 they agree to
matmul summation order.)

The backward recomputes ``h`` tile by tile instead of saving it (same cost as the forward matmul, no
M x E activation kept alive), and emits ``dh`` and ``dmemory`` in its epilogue; ``dx = dh @ W`` and
``dW = dh^T @ x`` are plain matmuls on ``dh``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["gmu_triton"]


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _gmu_h_tile(x_ptr, w_ptr, M, N, K, s_xm, s_xk, s_wn, s_wk, offs_m, offs_n,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, MM_ACC: tl.constexpr):
    """Tile h[offs_m, offs_n] = x[offs_m, :] @ W[offs_n, :]^T accumulated in MM_ACC (fp32; fp64 for fp64
    inputs), masked at the M, N and K edges."""
    offs_k = tl.arange(0, BLOCK_K)
    # int64 row offsets: M * K can exceed 2**31 elements for long prefills.
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm + offs_k[None, :] * s_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * s_wn + offs_k[:, None] * s_wk   # (BLOCK_K, BLOCK_N) = W^T
    m_mask = (offs_m < M)[:, None]
    n_mask = (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=MM_ACC)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(x_ptrs, mask=m_mask & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=n_mask & (offs_k[:, None] < k_left), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=MM_ACC)
        x_ptrs += BLOCK_K * s_xk
        w_ptrs += BLOCK_K * s_wk
    return acc


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("swizzled") tile order: GROUP_M row tiles share each W column tile while it is in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    group = pid // pids_per_group
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


@triton.jit
def _gmu_fwd_kernel(
    x_ptr, w_ptr, mem_ptr, out_ptr,
    M, N, K,                      # x (M, K), W (N, K), memory/out (M, N)
    s_xm, s_xk, s_wn, s_wk, s_mm, s_mn, s_om, s_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, MM_ACC: tl.constexpr, GATE: tl.constexpr,
):
    """out = silu(x @ W^T) * memory; h stays in fp32 (GATE) registers, one rounding at the store."""
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    h = _gmu_h_tile(x_ptr, w_ptr, M, N, K, s_xm, s_xk, s_wn, s_wk, offs_m, offs_n, BLOCK_M, BLOCK_N,
                    BLOCK_K, INPUT_PRECISION, MM_ACC).to(GATE)

    rows = offs_m.to(tl.int64)[:, None]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    mem = tl.load(mem_ptr + rows * s_mm + offs_n[None, :] * s_mn, mask=mask, other=0.0).to(GATE)
    out = h / (1.0 + tl.exp(-h)) * mem          # PyTorch's silu formula, in GATE precision (fp32)
    tl.store(out_ptr + rows * s_om + offs_n[None, :] * s_on, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gmu_bwd_kernel(
    x_ptr, w_ptr, mem_ptr, grad_ptr, dh_ptr, dmem_ptr,
    M, N, K,
    s_xm, s_xk, s_wn, s_wk, s_mm, s_mn, s_gm, s_gn, s_dhm, s_dhn, s_dmm, s_dmn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, MM_ACC: tl.constexpr, GATE: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DMEM: tl.constexpr,
):
    """Recompute h = x @ W^T per tile; emit dh = g * memory * dsilu(h) and dmemory = g * silu(h)."""
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    h = _gmu_h_tile(x_ptr, w_ptr, M, N, K, s_xm, s_xk, s_wn, s_wk, offs_m, offs_n, BLOCK_M, BLOCK_N,
                    BLOCK_K, INPUT_PRECISION, MM_ACC).to(GATE)

    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    g = tl.load(grad_ptr + rows * s_gm + cols * s_gn, mask=mask, other=0.0).to(GATE)
    sig = 1.0 / (1.0 + tl.exp(-h))
    if NEED_DH:
        mem = tl.load(mem_ptr + rows * s_mm + cols * s_mn, mask=mask, other=0.0).to(GATE)
        dh = g * mem * (sig * (1.0 + h * (1.0 - sig)))
        tl.store(dh_ptr + rows * s_dhm + cols * s_dhn, dh.to(dh_ptr.dtype.element_ty), mask=mask)
    if NEED_DMEM:
        dmem = g * (h * sig)
        tl.store(dmem_ptr + rows * s_dmm + cols * s_dmn, dmem.to(dmem_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
def _gmu_config(M: int, dtype: torch.dtype, mem_dtype: torch.dtype, block_m: int | None, block_n: int | None,
                block_k: int | None, group_m: int | None, backward: bool = False) -> dict:
    """Tile sizes, math dtypes and launch options for inputs of ``dtype`` and a memory of ``mem_dtype``.

    Fixed heuristics rather than autotuning: M changes every call (prefill vs decode) and an autotuner
    would re-benchmark for each new M.
    """
    if dtype == torch.float64:                 # gradcheck only: small tiles, correctness over speed
        bm, bn, bk, warps, stages = 32, 32, 32, 4, 2
    elif dtype == torch.float32:
        # fp32 tiles are twice the bytes of bf16 ones; keep the pipelined shared memory under ~50 KB.
        bm, bn, bk, warps, stages = 64, 64, 32, 4, 3
    elif backward:
        # The backward's epilogue holds h, sigmoid(h), the incoming gradient and memory tiles at once: at
        # 128 x 128 it needed 255 registers and spilled (sm_80 and sm_90, checked by sambay.kernels.compile_check).
        bm, bn, bk, warps, stages = 128, 64, 64, 8, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    # Decode-sized M: don't burn a 128-row tile (tl.dot needs >= 16 rows).
    bm = min(bm, max(16, triton.next_power_of_2(max(M, 1))))
    wide = tl.float64 if dtype == torch.float64 else tl.float32
    return {
        "BLOCK_M": block_m or bm, "BLOCK_N": block_n or bn, "BLOCK_K": block_k or bk, "GROUP_M": group_m or 8,
        # fp32 inputs: full-precision products like torch's default matmul (TF32 off); 16-bit inputs:
        # None = the backend's default (tensor cores; "tf32" is not a valid name on every backend).
        "INPUT_PRECISION": None if dtype in (torch.bfloat16, torch.float16) else "ieee",
        # the gate runs in fp64 if either operand is fp64, as the twin's upcast does
        "MM_ACC": wide, "GATE": tl.float64 if torch.float64 in (dtype, mem_dtype) else tl.float32,
        "num_warps": warps, "num_stages": stages,
    }


def _grid(M: int, N: int, cfg: dict) -> tuple[int]:
    return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)


def _gmu_fwd(x: torch.Tensor, w: torch.Tensor, mem: torch.Tensor, *, block_m: int | None = None,
             block_n: int | None = None, block_k: int | None = None, group_m: int | None = None,
             ) -> torch.Tensor:
    """x: (M, K), w: (N, K), mem: (M, N), any strides. Returns out (M, N) contiguous in x.dtype.
    The block/group arguments override the tiling (tests use small tiles to cross tile edges)."""
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    cfg = _gmu_config(M, x.dtype, mem.dtype, block_m, block_n, block_k, group_m)
    _gmu_fwd_kernel[_grid(M, N, cfg)](x, w, mem, out, M, N, K, x.stride(0), x.stride(1), w.stride(0),
                                      w.stride(1), mem.stride(0), mem.stride(1), out.stride(0),
                                      out.stride(1), **cfg)
    return out


def _gmu_bwd(x: torch.Tensor, w: torch.Tensor, mem: torch.Tensor, grad: torch.Tensor, need_dh: bool = True,
             need_dmem: bool = True, *, block_m: int | None = None, block_n: int | None = None,
             block_k: int | None = None, group_m: int | None = None,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """x: (M, K), w: (N, K), mem and grad: (M, N), any strides (grad may be an expanded stride-0 view).

    Returns (dh (M, N) in x.dtype, dmem (M, N) in mem.dtype), contiguous; an unneeded one is None.
    dh is rounded to x.dtype because it feeds the dx/dW matmuls in that dtype, where the twin's
    autograd also rounds it.
    """
    M, K = x.shape
    N = w.shape[0]
    dh = torch.empty((M, N), dtype=x.dtype, device=x.device) if need_dh else None
    dmem = torch.empty((M, N), dtype=mem.dtype, device=mem.device) if need_dmem else None
    if M == 0 or N == 0 or not (need_dh or need_dmem):
        return dh, dmem
    cfg = _gmu_config(M, x.dtype, mem.dtype, block_m, block_n, block_k, group_m, backward=True)
    # An unneeded output gets a stand-in pointer; the constexpr flag removes its store entirely.
    dh_arg = dh if need_dh else dmem
    dmem_arg = dmem if need_dmem else dh
    _gmu_bwd_kernel[_grid(M, N, cfg)](x, w, mem, grad, dh_arg, dmem_arg, M, N, K,
                                      x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                      mem.stride(0), mem.stride(1), grad.stride(0), grad.stride(1),
                                      dh_arg.stride(0), dh_arg.stride(1), dmem_arg.stride(0),
                                      dmem_arg.stride(1), NEED_DH=need_dh, NEED_DMEM=need_dmem, **cfg)
    return dh, dmem


# ------------------------------------------------------------------------------------------ autograd glue
def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D); explicit M because ``reshape(-1, 0)`` is ambiguous when D == 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class _GmuFunction(torch.autograd.Function):
    """Saves x, W and memory (all needed anyway), never h: the backward kernel recomputes it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        # Views whenever the leading dims collapse by strides (fused halves, sliced steps); a copy only
        # for layouts that are not rows-with-a-stride (e.g. transposed leading dims).
        x2, mem2 = _rows(x), _rows(mem)
        ctx.save_for_backward(x2, w, mem2)
        ctx.x_shape = x.shape
        return _gmu_fwd(x2, w, mem2).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    @once_differentiable          # the backward is a Triton kernel: no double backward through it
    def backward(ctx, grad: torch.Tensor):
        x2, w, mem2 = ctx.saved_tensors
        need_dx, need_dw, need_dmem = ctx.needs_input_grad[:3]
        g2 = _rows(grad)
        dh, dmem = _gmu_bwd(x2, w, mem2, g2, need_dh=need_dx or need_dw, need_dmem=need_dmem)
        dx = (dh @ w).reshape(ctx.x_shape) if need_dx else None
        dw = dh.t() @ x2 if need_dw else None
        if dmem is not None:
            dmem = dmem.reshape(grad.shape)
        return dx, dw, dmem


# ------------------------------------------------------------------------------------------------ public
def gmu_triton(x: torch.Tensor, in_proj_weight: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """silu(x @ in_proj_weight^T) * memory as one Triton matmul with a gating epilogue.

    Args:
        x: (..., C) float32/bfloat16/float16 (float64 too, computed in fp64), any strides.
        in_proj_weight: (E, C), same dtype as x, any strides (e.g. a slice of a fused weight).
        memory: (..., E), same leading shape as x; float32 or x's dtype.
    Returns:
        (..., E) contiguous in ``x.dtype``: fp32 accumulation, fp32 gate, one rounding.
    """
    if in_proj_weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != in_proj_weight.shape[1]:
        raise ValueError(f"gmu: x (..., C) and in_proj_weight (E, C) do not match: {tuple(x.shape)} and "
                         f"{tuple(in_proj_weight.shape)}")
    expected = (*x.shape[:-1], in_proj_weight.shape[0])
    if tuple(memory.shape) != expected:
        raise ValueError(f"gmu: memory must have shape {expected}, got {tuple(memory.shape)}")
    if x.dtype != in_proj_weight.dtype:
        raise ValueError(f"gmu: x and in_proj_weight must share a dtype, got {x.dtype} and {in_proj_weight.dtype}")
    if not (x.is_floating_point() and memory.is_floating_point()):
        raise ValueError(f"gmu: expected floating-point tensors, got {x.dtype} and {memory.dtype}")
    if not (x.device == in_proj_weight.device == memory.device):
        raise ValueError(f"gmu: tensors must be on one device, got {x.device}, {in_proj_weight.device}, "
                         f"{memory.device}")
    return _GmuFunction.apply(x, in_proj_weight, memory)
