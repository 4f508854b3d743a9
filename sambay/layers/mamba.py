"""Mamba-1 mixer (selective SSM), as in the released checkpoint (``model.layers.{i}.attn.*``).

forward(x) runs a whole chunk (prefill, chunked prefill or training); step(x, state) runs one token.
Both return ``(out, memory)``; on the memory producer ``memory`` is the *ungated* scan output y (after
the D skip, before the silu(z) gate and out_proj), which SambaY exports to every GMU; elsewhere None.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sambay.kernels import causal_conv1d, causal_conv1d_step, selective_scan, selective_step, silu_mul
from sambay.kernels.common import f32
from sambay.layers.linear import PLAIN_LINEARS, Linear


class Mamba(nn.Module):
    """Args: hidden (C), d_inner (E), d_state (N), d_conv (K), dt_rank (R), conv_bias, proj_bias,
    memory_producer: if True the output gate is applied to y rounded to the model dtype (the HF
    memory layer's second rounding); otherwise y * silu(z) is fused in fp32 with one rounding."""

    def __init__(self, hidden: int, d_inner: int, d_state: int = 16, d_conv: int = 4, dt_rank: int | None = None,
                 conv_bias: bool = True, proj_bias: bool = False, memory_producer: bool = False,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(hidden / 16)
        self.memory_producer = memory_producer
        self.backend = "auto"  # one of sambay.kernels.BACKENDS, for every op of the layer
        self.in_proj = Linear(hidden, 2 * d_inner, bias=proj_bias, **kw)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias, **kw)
        self.x_proj = Linear(d_inner, self.dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = Linear(self.dt_rank, d_inner, bias=True, **kw)
        # Keep in fp32 whatever the model dtype (mamba_ssm does the same): A = -exp(A_log) and D.
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(d_inner, device=device, dtype=torch.float32))
        self.out_proj = Linear(d_inner, hidden, bias=proj_bias, **kw)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba-1 initialisation (S4D-real A, dt log-uniform in [1e-3, 1e-1])."""
        for lin in (self.in_proj, self.x_proj, self.out_proj):
            lin.reset_parameters()
        self.conv1d.reset_parameters()
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner, device=self.D.device) * (math.log(0.1) - math.log(1e-3))
                       + math.log(1e-3)).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(a).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def _ssm_inputs(self, xc: torch.Tensor):
        """From the conv output (B, T, E) compute the raw time step dt (B, T, E) in the model dtype, its bias
        (E,) or None, and B, C (B, T, N). The scan ops compute delta = softplus(f32(dt) + f32(dt_bias)) (threshold
        20), the bias added in fp32 as HF does; this is also mamba_ssm's calling convention (delta_bias)."""
        dt_raw, b, c = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if type(self.dt_proj) in PLAIN_LINEARS:
            return self.dt_proj.matmul(dt_raw), self.dt_proj.bias, b, c
        # dt_proj was wrapped (e.g. a LoRA adapter): call it so the wrapper's math is not bypassed
        # (the bias is then added in the model dtype, one extra rounding in bf16).
        return self.dt_proj(dt_raw), None, b, c

    def _outputs(self, scan, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the output gate where HF does. ``scan(z)`` runs the scan, gated by z when given.
        Returns (gated output, memory); memory is None except on the memory producer."""
        if not self.memory_producer:
            return scan(z), None  # y * silu(z) fused in the scan in fp32, one rounding (HF layers 0..N/2-2)
        memory = scan(None)  # the ungated y, rounded to the model dtype: the memory
        return silu_mul(z, memory, self.backend), memory  # HF: a second rounding after the gate

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, state=None, fresh: bool = True):
        """Args:
            x: (B, T, C) normed hidden states.
            mask: (B, T) 1 for real tokens, 0 for (left) padding, or None.
            state: a ``MambaState`` to update in place, or None.
            fresh: True when ``state`` holds nothing yet (the first chunk): start from zeros.
        Returns:
            out (B, T, C), memory (B, T, E) on the memory producer, else None.
        """
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        if mask is not None:
            xs = xs * mask[..., None].to(xs.dtype)
        K = self.d_conv
        xs_t = xs.transpose(1, 2)  # (B, E, T)
        if state is not None and not fresh:
            history = torch.cat([state.conv.to(xs.dtype), xs_t], dim=2)  # (B, E, K-1+T)
        else:
            history = F.pad(xs_t, (K - 1, 0))
        if state is not None:
            state.conv.copy_(history[:, :, -(K - 1):])
        xc = causal_conv1d(history, self.conv1d.weight[:, 0], self.conv1d.bias, self.backend).transpose(1, 2)
        if mask is not None:
            xc = xc * mask[..., None].to(xc.dtype)
        dt, dt_bias, b, c = self._ssm_inputs(xc)
        A = -torch.exp(f32(self.A_log))
        s0 = state.ssm if state is not None and not fresh else None

        def scan(gate):
            out, last = selective_scan(xc, dt, A, b, c, self.D, z=gate, dt_bias=dt_bias, s0=s0, backend=self.backend)
            if state is not None:
                state.ssm.copy_(last)
            return out

        out, memory = self._outputs(scan, z)
        return self.out_proj(out), memory

    def step(self, x: torch.Tensor, state, mask: torch.Tensor | None = None):
        """One decode token. x: (B, 1, C); ``state`` (MambaState) is updated in place; mask: (B, 1) or None.
        Returns out (B, 1, C), memory (B, 1, E) on the memory producer, else None."""
        xs, z = self.in_proj(x)[:, 0].chunk(2, dim=-1)  # (B, E)
        if mask is not None:
            xs = xs * mask.to(xs.dtype)
        xc = causal_conv1d_step(state.conv, xs, self.conv1d.weight[:, 0], self.conv1d.bias, self.backend)
        if mask is not None:
            xc = xc * mask.to(xc.dtype)
        dt, dt_bias, b, c = self._ssm_inputs(xc)
        A = -torch.exp(f32(self.A_log))

        def scan(gate):
            return selective_step(state.ssm, xc, dt, A, b, c, self.D, z=gate, dt_bias=dt_bias, backend=self.backend)

        out, memory = self._outputs(scan, z)
        return self.out_proj(out[:, None]), None if memory is None else memory[:, None]
