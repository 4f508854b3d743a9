"""SwiGLU MLP: fc1 -> [gate | value] halves -> silu(gate) * value (fp32, one rounding) -> fc2."""

from __future__ import annotations

import torch
from torch import nn

from sambay.kernels import silu_mul
from sambay.layers.linear import Linear


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = Linear(hidden, 2 * intermediate, bias=False, device=device, dtype=dtype)
        self.fc2 = Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)
        self.backend = "auto"  # one of sambay.kernels.BACKENDS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). The halves are strided views of fc1's output (no copy)."""
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(silu_mul(gate, value, self.backend))
