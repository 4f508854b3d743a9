"""SambaY's building blocks. Layers take explicit sizes, never the config (testable alone)."""

from sambay.layers.attention import (
           Attention,
           AttnCall,
           CrossAttention,
           DiffAttentionCore,
           to_reference_layout,
)
from sambay.layers.gmu import GMU
from sambay.layers.linear import Linear, QuantLinear
from sambay.layers.mamba import Mamba
from sambay.layers.mlp import MLP

# The layers that call sambay.kernels ops; each has a ``backend`` attribute (one of sambay.kernels.BACKENDS).
BACKEND_LAYERS = (Mamba, MLP, GMU, DiffAttentionCore, Linear, QuantLinear)

__all__ = [
           "BACKEND_LAYERS",
           "GMU",
           "Linear",
           "QuantLinear",
           "MLP",
           "Attention",
           "AttnCall",
           "CrossAttention",
           "DiffAttentionCore",
           "Mamba",
           "to_reference_layout",
]
