"""Differential attention (Ye et al., 2024) as SambaY uses it, with no positional encoding.

Heads are paired in even/odd stripes: differential head j takes query heads 2j (positive map) and
2j+1 (negative map); kv pair g takes K heads 2g, 2g+1 and V heads 2g, 2g+1. Inside a stripe, GQA is
consecutive (diff head j reads kv pair j // group). For each diff head:

    O1 = softmax(q_{2j} k_{2g}^T / sqrt(D)) [v_{2g} | v_{2g+1}]     O2 = same with q_{2j+1}, k_{2g+1}
    out_j = (1 - lambda_init) * subln(O1 - lambda * O2)              (2D dims -> heads 2j, 2j+1)

Because [v_{2g} | v_{2g+1}] is contiguous in Wqkv's output, each map is one SDPA call with a 2D-wide
value, and K/V are read once per map with no copy. K/V tensors use the cache layout (sambay.cache):
k (B, 2, Hkv/2, S, D), v (B, Hkv/2, S, 2D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sambay.kernels.attention import diff_attend
from sambay.kernels.common import f32
from sambay.layers.linear import Linear


@dataclass
class AttnCall:
    """One SDPA call of an attention plan: query rows ``q`` attend key columns ``k`` under ``mask``
    ((B, 1, tq, tk) bool, True = visible) or, when mask is None, under ``causal`` (top-left aligned,
    used only when tq == tk) or no mask at all."""

    q: slice
    k: slice
    mask: torch.Tensor | None = None
    causal: bool = False
    # (causal, window) when the visibility is exactly flash-attn's bottom-right causal flag plus a window of
    # ``window`` keys (None = unlimited), with no padding and keys in position order; else None.
    flash: tuple[bool, int | None] | None = None
    # The static decode step's (1,) device tensor pos + 1: key columns from it on are invisible under ``mask``
    # too, and the decode kernels read none of them (the shapes stay those of the whole cache).
    length: torch.Tensor | None = None


class SubLN(nn.Module):
    """RMSNorm over the 2D dims of a differential head (eps 1e-5, weight, no bias). As in HF, the
    normalised value is rounded to the input dtype before the weight multiply."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = f32(x)
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return n.to(x.dtype) * self.weight


class DiffAttentionCore(nn.Module):
    """The parameters and math shared by self and cross differential attention (``inner_cross_attn``)."""

    def __init__(self, head_dim: int, lambda_init: float, device=None, dtype=None):
        super().__init__()
        self.head_dim = head_dim
        self.lambda_init = lambda_init
        self.scale = head_dim ** -0.5
        self.dropout = 0.0  # attention-probability dropout, applied only in training
        self.backend = "auto"  # one of sambay.kernels.BACKENDS
        # Kept in fp32 whatever the model dtype (the HF module creates them in fp32).
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.empty(head_dim, device=device, dtype=torch.float32)))
        self.subln = SubLN(2 * head_dim, device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, std=0.1)
        self.subln.weight.fill_(1.0)

    def lam(self, dtype: torch.dtype) -> torch.Tensor:
        """lambda = exp(<lq1, lk1>) - exp(<lq2, lk2>) + lambda_init, rounded as HF does."""
        l1 = torch.exp(f32((self.lambda_q1 * self.lambda_k1).sum())).to(dtype)
        l2 = torch.exp(f32((self.lambda_q2 * self.lambda_k2).sum())).to(dtype)
        return (l1 - l2) + self.lambda_init

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: list[AttnCall],
                q_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            q: (B, T, Hq, D) queries in checkpoint head order.
            k: (B, 2, Hkv/2, S, D); v: (B, Hkv/2, S, 2D).
            plan: SDPA calls covering the T query rows in order.
            q_valid: (B, T) bool, False at padded query rows (their output is zeroed, as HF's unpad does).
        Returns:
            (B, T, Hq * D)
        """
        B, T, Hq, D = q.shape
        q = q.view(B, T, Hq // 2, 2, D)
        q1 = q[:, :, :, 0].transpose(1, 2)  # (B, Hq/2, T, D)
        q2 = q[:, :, :, 1].transpose(1, 2)
        p = self.dropout if self.training else 0.0
        lam = self.lam(q.dtype)
        outs = []
        for c in plan:
            kk, vv = k[..., c.k, :], v[..., c.k, :]  # time is the second-to-last dim of both
            outs.append(diff_attend(q1[:, :, c.q], q2[:, :, c.q], kk, vv, c.mask, c.causal, self.scale, lam, p,
                                    c.flash, self.backend, c.length))  # (B, Hq/2, tq, 2D)
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        o = self.subln(o) * (1.0 - self.lambda_init)
        o = o.transpose(1, 2).reshape(B, T, Hq * D)  # diff head j -> heads 2j, 2j+1
        if q_valid is not None:
            o = o * q_valid[..., None].to(o.dtype)
        return o


class Attention(nn.Module):
    """Self differential attention with its own K/V: sliding-window (layers 1, 3, ... < N/2) or full
    (layer N/2+1, whose K/V are shared with the cross-decoder). Which one is decided by the plan and
    the cache slot the model passes; the module itself only projects, attends and writes K/V."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, lambda_init: float,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.Wqkv = Linear(hidden, (num_heads + 2 * num_kv_heads) * head_dim, bias=True, **kw)
        self.out_proj = Linear(num_heads * head_dim, hidden, bias=True, **kw)
        self.inner_cross_attn = DiffAttentionCore(head_dim, lambda_init, **kw)

    def project(self, x: torch.Tensor):
        """x (B, T, C) -> q (B, T, Hq, D), k (B, 2, Hkv/2, T, D), v (B, Hkv/2, T, 2D)."""
        B, T, _ = x.shape
        D, Hq, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.Wqkv(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, Hq, D)
        k = k.view(B, T, Hkv // 2, 2, D).permute(0, 3, 2, 1, 4)  # (B, 2, Hkv/2, T, D): stripe-major
        v = v.view(B, T, Hkv // 2, 2 * D).transpose(1, 2)  # (B, Hkv/2, T, 2D): [v_2g | v_2g+1]
        return q, k, v

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: list[AttnCall],
                q_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Attend projected queries to the given keys (this layer's own, possibly from its cache)."""
        return self.out_proj(self.inner_cross_attn(q, k, v, plan, q_valid))


class CrossAttention(nn.Module):
    """Cross-decoder differential attention: its own queries (Wqkv produces Q only), the K/V of the
    full-attention layer. Stateless."""

    def __init__(self, hidden: int, num_heads: int, head_dim: int, lambda_init: float, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim = num_heads, head_dim
        self.Wqkv = Linear(hidden, num_heads * head_dim, bias=True, **kw)
        self.out_proj = Linear(num_heads * head_dim, hidden, bias=True, **kw)
        self.inner_cross_attn = DiffAttentionCore(head_dim, lambda_init, **kw)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: list[AttnCall],
                q_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C); k, v: the shared K/V in cache layout. Returns (B, T, C)."""
        B, T, _ = x.shape
        q = self.Wqkv(x).view(B, T, self.num_heads, self.head_dim)
        return self.out_proj(self.inner_cross_attn(q, k, v, plan, q_valid))


def to_reference_layout(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache layout -> the HF layout (B, Hkv, S, D) with checkpoint head order (for tests and interop)."""
    B, _, G, S, D = k.shape
    k_ref = k.permute(0, 2, 1, 3, 4).reshape(B, 2 * G, S, D)  # head 2g+s <- stripe s, pair g
    v_ref = v.view(B, G, S, 2, D).permute(0, 1, 3, 2, 4).reshape(B, 2 * G, S, D)
    return k_ref, v_ref
