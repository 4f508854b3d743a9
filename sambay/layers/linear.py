"""The linear layers of every SambaY block: a dense one and its weight-only quantized form.

``Linear`` is ``nn.Linear`` (same parameters, keys, init, and exactly ``F.linear``'s math) whose forward goes
through :func:`sambay.kernels.linear`, so decode-sized calls on CPU stream the weight once (see
:mod:`sambay.kernels.linear`). ``QuantLinear`` holds an int8 or int4 weight (formats in
:mod:`sambay.kernels.linear.ref`) and computes ``x @ dequantize(W)^T + bias`` with fp32 accumulation; it is made by
:mod:`sambay.quant` (``model.quantize(...)`` or ``from_pretrained(..., quantize=...)``), not trained.

Both have ``matmul(x)``, the product without the bias (Mamba adds dt_proj's bias in fp32 inside the scan).
"""

from __future__ import annotations

import torch
from torch import nn

from sambay.kernels.linear import linear, linear_int4, linear_int4_a8, linear_int8, linear_int8_a8
from sambay.kernels.linear import ref as quant_ref


class Linear(nn.Linear):
    backend = "auto"  # one of sambay.kernels.BACKENDS (set per instance by model.set_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.backend)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, None, self.backend)


class QuantLinear(nn.Module):
    """A weight-only quantized linear: int8 per output channel, or int4 per group of ``group_size`` columns.

    Buffers (the state-dict entries ``<name>.qweight``, ``<name>.scales`` and, for int4, ``<name>.mins``) as in
    :mod:`sambay.kernels.linear.ref`; ``bias`` (N,) keeps its dtype. Outputs are in ``dtype`` (the model's).
    ``activations``: None (weight-only: the activation as it is) or "int8" (the activation quantized per block of
    32 columns before the product, linear.ref.fake_quantize_activations; a mode, not stored in the weights).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.bfloat16, device=None, activations: str | None = None):
        super().__init__()
        if activations not in (None, "int8"):
            raise ValueError(f"QuantLinear: activations must be None or 'int8', got {activations!r}")
        self.activations = activations
        if bits not in (4, 8):
            raise ValueError(f"QuantLinear: bits must be 8 or 4, got {bits!r}")
        if bits == 4 and (group_size not in quant_ref.INT4_GROUP_SIZES or in_features % group_size):
            raise ValueError(f"QuantLinear: int4 needs group_size in {quant_ref.INT4_GROUP_SIZES} dividing "
                             f"in_features={in_features}, got {group_size!r}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else None
        self.dtype = dtype
        self.backend = "auto"
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(N, dtype=torch.float32, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(N, K // group_size, dtype=torch.bfloat16, device=device))
            self.register_buffer("mins", torch.zeros(N, K // group_size, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.zeros(N, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None,
                    activations: str | None = None) -> QuantLinear:
        """Quantize ``linear``'s weight (the result shares nothing with it)."""
        w = linear.weight
        q = cls(w.shape[1], w.shape[0], bits, group_size, bias=linear.bias is not None, dtype=w.dtype,
                device=torch.device("meta"), activations=activations)
        q.load_weight(w)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    @torch.no_grad()
    def load_weight(self, w: torch.Tensor) -> None:
        """Set the quantized buffers from a dense (N, K) weight (replacing them, on ``w``'s device)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear.load_weight: expected a ({self.out_features}, {self.in_features}) "
                             f"weight, got {tuple(w.shape)}")
        if self.bits == 8:
            self.qweight, self.scales = quant_ref.quantize_int8(w)
        else:
            self.qweight, self.scales, self.mins = quant_ref.quantize_int4(w, self.group_size)

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)`` / ``.half()`` / ``.float()`` convert the bias but keep the buffers in their format's
        dtypes (moving them across devices still happens): a cast would cost int8's fp32 scales bits and leave
        int4's bf16 scales unreadable by the kernels."""
        formats = {id(b): b for b in self._buffers.values() if b is not None}

        def keep_format(t):
            out = fn(t)
            return t.to(out.device) if id(t) in formats and out.dtype != t.dtype else out

        return super()._apply(keep_format, recurse)

    def dequantize(self) -> torch.Tensor:
        """The weight the layer computes with: (N, K) fp32."""
        if self.bits == 8:
            return quant_ref.dequantize_int8(self.qweight, self.scales)
        return quant_ref.dequantize_int4(self.qweight, self.scales, self.mins, self.group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_to(x, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_to(x, self.bias)

    def _apply_to(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a8 = self.activations == "int8"
        if self.bits == 8:
            return (linear_int8_a8 if a8 else linear_int8)(x, self.qweight, self.scales, bias, self.backend)
        return (linear_int4_a8 if a8 else linear_int4)(x, self.qweight, self.scales, self.mins, self.group_size, bias,
                                                        self.backend)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        a = f", activations={self.activations}" if self.activations else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}{a}, "
                f"bias={self.bias is not None}, dtype={self.dtype}")


# The layer types that take the fused paths (gmu's weight, dt_proj's bias in fp32); any other module in their
# place (a LoRA wrapper, say) is called as a module so its own math is not bypassed.
PLAIN_LINEARS = (Linear, QuantLinear)
