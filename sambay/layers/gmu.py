"""Gated Memory Unit (SambaY cross-decoder): out_proj(silu(in_proj(x)) * memory).

The memory is the memory layer's ungated Mamba scan output for the same positions; the GMU owns no
state, so decoding needs nothing cached for it."""

from __future__ import annotations

import torch
from torch import nn

from sambay.kernels import gmu, silu_mul
from sambay.layers.linear import Linear


class GMU(nn.Module):
    def __init__(self, hidden: int, d_inner: int, device=None, dtype=None):
        super().__init__()
        self.in_proj = Linear(hidden, d_inner, bias=False, device=device, dtype=dtype)
        self.out_proj = Linear(d_inner, hidden, bias=False, device=device, dtype=dtype)
        self.backend = "auto"  # one of sambay.kernels.BACKENDS

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C), memory: (B, T, E) -> (B, T, C)."""
        if type(self.in_proj) is Linear:
            return self.out_proj(gmu(x, self.in_proj.weight, memory, self.backend))
        # in_proj was quantized or wrapped (e.g. a LoRA adapter): call it so its own math is not bypassed.
        return self.out_proj(silu_mul(self.in_proj(x), memory, self.backend))
