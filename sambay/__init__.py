"""sambay: the SambaY decoder-hybrid-decoder (Phi-4-mini-flash-reasoning) in plain PyTorch."""

from sambay.cache import SambaYCache, cache_nbytes
from sambay.config import SambaYConfig
from sambay.lm import CausalLMOutput, SambaYForCausalLM
from sambay.model import SambaYModel

# transformers is optional and heavy: nothing here imports it. sambay.hf.register() makes the Auto classes
# build sambay's model; checkpoints sambay saves also load with trust_remote_code=True (see sambay.hf).

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device=None, **kwargs) -> SambaYForCausalLM:
    """Load a checkpoint directory (or hub id) as a SambaYForCausalLM; keywords (quantize, group_size, check_finite)
    as SambaYForCausalLM.from_pretrained."""
    return SambaYForCausalLM.from_pretrained(path, dtype=dtype, device=device, **kwargs)


def generate(model, input_ids, **kwargs):
    """model.generate(input_ids, **kwargs) as a function."""
    from sambay.generation import generate as _generate

    return _generate(model, input_ids, **kwargs)


__all__ = [
    "CausalLMOutput",
    "SambaYCache",
    "SambaYConfig",
    "SambaYForCausalLM",
    "SambaYModel",
    "cache_nbytes",
    "from_pretrained",
    "generate",
]
