"""The two subjects of every comparison, built with random weights at the same shape.

sambay: ``SambaYForCausalLM`` from the plan's config. The baseline: ``transformers.Phi3ForCausalLM`` (the
architecture of Phi-4-mini, a plain GQA transformer) with the same hidden size, layers, heads, KV heads,
intermediate size and vocabulary, tied embeddings, SDPA attention. transformers is imported lazily.
"""

from __future__ import annotations

import contextlib

import torch

from sambay import SambaYConfig, SambaYForCausalLM

BASELINE_NAME = "phi3"
MISSING_TRANSFORMERS = (
    "sambay bench compares against transformers.Phi3ForCausalLM: install it with "
    "pip install 'sambay[bench]' (or pip install transformers)"
)


class MissingDependency(RuntimeError):
    pass


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependency(MISSING_TRANSFORMERS) from None
    return transformers


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_sambay(
    config: dict, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> SambaYForCausalLM:
    torch.manual_seed(seed)
    return SambaYForCausalLM(SambaYConfig.from_dict(config), device=device, dtype=dtype).eval()


def baseline_config(config: dict):
    """The same-shape Phi3Config for a sambay config dict."""
    tf = import_transformers()
    c = SambaYConfig.from_dict(config)
    pc = tf.Phi3Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    pc._attn_implementation = "sdpa"
    return pc


def build_baseline(config: dict, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    """Phi3ForCausalLM with random weights, created directly on ``device`` in ``dtype``."""
    tf = import_transformers()
    pc = baseline_config(config)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = tf.Phi3ForCausalLM(pc)
    return model.to(device=device, dtype=dtype).eval()


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once by parameters()


def short_shape(config: dict) -> str:
    c = SambaYConfig.from_dict(config)
    return (
        f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads}/{c.num_key_value_heads} "
        f"heads, vocab {c.vocab_size}"
    )


def shape_summary(config: dict) -> str:
    c = SambaYConfig.from_dict(config)
    return (
        f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads / "
        f"{c.num_key_value_heads} KV heads (head dim {c.head_dim}), intermediate {c.intermediate_size}, "
        f"vocab {c.vocab_size}, window {c.sliding_window}"
    )
