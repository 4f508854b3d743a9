"""SambaY's building blocks. Layers take explicit sizes, never the config (testable alone)."""

from sambay.layers.attention import (
           Attention,
           AttnCall,
           CrossAttention,
           DiffAttentionCore,
           to_reference_layout,
)
from sambay.layers.gmu import GMU
from sambay.layers.mamba import Mamba
from sambay.layers.mlp import MLP

__all__ = [
           "GMU",
           "MLP",
           "Attention",
           "AttnCall",
           "CrossAttention",
           "DiffAttentionCore",
           "Mamba",
           "to_reference_layout",
]
