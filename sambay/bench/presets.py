"""What `sambay bench` measures, at which sizes: the model configs and one size plan per mode.

The configs are HF ``config.json`` dicts (the same values as ``configs/*.json`` in a checkout; they are
copied here so that the installed ``sambay`` command works anywhere, and ``tests/test_bench.py`` checks
that the copies still match). Only the architecture keys matter to the benchmark.

Modes:
    cpu full  : the scaled config (the released layer pattern: 32 layers, window 512, 2:1 query/KV heads,
                head dim 64, intermediate 4x hidden) in fp32; contexts up to 32K. < 10 min on 2 cores.
    cpu quick : the same model, fewer and shorter points. About a minute on 2 cores.
    cuda      : the released config in bf16 with random weights (quick shrinks the sweeps).
    tiny      : a test-only preset (8 layers, hidden 64) that runs every section in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_COMMON = {
    "model_type": "phi4flash",
    "hidden_act": "silu",
    "layer_norm_eps": 1e-05,
    "mb_per_layer": 2,
    "tie_word_embeddings": True,
    "max_position_embeddings": 262144,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# configs/phi4-mini-flash-reasoning.json (architecture keys)
RELEASED = {
    **_COMMON,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 40,
    "num_key_value_heads": 20,
    "sliding_window": 512,
    "vocab_size": 200064,
}
# configs/sambay-scaled-cpu.json: the released pattern at hidden 256 (head dim 64, as released).
SCALED_CPU = {
    **_COMMON,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 512,
    "vocab_size": 32064,
}
# Test-only: every section runs in seconds. Window 32 so that the ring wraps many times at short contexts.
TINY = {
    **_COMMON,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 32,
    "vocab_size": 512,
}


def checkpoint_config(hidden: int, layers: int, heads: int, vocab: int = 32064) -> dict:
    """A config for the C7 load test: bigger matrices than the timed model so the checkpoint is a few
    hundred MB (the file, not the process, should dominate RSS)."""
    return {
        **_COMMON,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "sliding_window": 512,
        "vocab_size": vocab,
    }


@dataclass(frozen=True)
class Plan:
    """Sizes of every section. Token counts are per sequence."""

    name: str
    model: dict  # HF config dict of the timed model (sambay and the same-shape baseline)
    dtype: str  # "float32" | "bfloat16"
    repeats: int  # interleaved repeats per timed point (medians over these)
    steps: int  # decode steps per timed block (one repeat = one block per model)
    c1_contexts: tuple[int, ...]  # decode-step time vs context
    c3_tokens: int  # YOCO prefill skip
    c3_repeats: int
    c3_all_logits: bool  # also time the forward that computes every position's logits (info only)
    c4_tokens: tuple[int, ...]  # prefill time vs prompt length; the first and last give the growth ratio
    c4_repeats: int  # prefill is long: fewer repeats
    c5_wraps: int  # window wraps before the "after" point of the ring check
    c6_context: int  # throughput vs batch at this context
    c6_batches: tuple[int, ...]  # must contain 1 and 8
    latency_prompt: int  # decode latency vs generation length, after a prompt of this many tokens
    latency_lengths: tuple[int, ...]  # generation lengths at which the running latency is recorded
    c7_checkpoint: dict = field(default_factory=dict)  # the config saved and reloaded for C7
    long_generation: int = 32768  # the announcement's generation length, for the extrapolated curve


def make_plan(quick: bool, device: str, tiny: bool = False) -> Plan:
    if tiny:
        return Plan(
            "tiny",
            TINY,
            "float32",
            repeats=3,
            steps=2,
            c1_contexts=(64, 2048, 8192),
            c3_tokens=256,
            c3_repeats=1,
            c3_all_logits=True,
            c4_tokens=(128, 512),
            c4_repeats=1,
            c5_wraps=8,
            c6_context=256,
            c6_batches=(1, 8),
            latency_prompt=64,
            latency_lengths=(16, 32),
            c7_checkpoint=checkpoint_config(128, 4, 4, 1024),
            long_generation=4096,
        )
    if device == "cuda":
        if quick:
            return Plan(
                "cuda-quick",
                RELEASED,
                "bfloat16",
                repeats=5,
                steps=8,
                c1_contexts=(512, 4096, 16384),
                c3_tokens=2048,
                c3_repeats=5,
                c3_all_logits=True,
                c4_tokens=(1024, 8192),
                c4_repeats=3,
                c5_wraps=16,
                c6_context=4096,
                c6_batches=(1, 8),
                latency_prompt=2048,
                latency_lengths=(128, 256),
                c7_checkpoint=checkpoint_config(512, 8, 8),
            )
        return Plan(
            "cuda",
            RELEASED,
            "bfloat16",
            repeats=7,
            steps=16,
            c1_contexts=(512, 2048, 8192, 16384, 32768),
            c3_tokens=2048,
            c3_repeats=7,
            c3_all_logits=True,
            c4_tokens=(1024, 2048, 4096, 8192),
            c4_repeats=5,
            c5_wraps=32,
            c6_context=4096,
            c6_batches=(1, 2, 4, 8, 16),
            latency_prompt=2048,
            latency_lengths=(256, 512, 1024),
            c7_checkpoint=checkpoint_config(768, 16, 12),
        )
    if quick:
        return Plan(
            "cpu-quick",
            SCALED_CPU,
            "float32",
            repeats=5,
            steps=1,
            c1_contexts=(512, 4096, 8192),
            c3_tokens=2048,
            c3_repeats=2,
            c3_all_logits=False,
            c4_tokens=(512, 2048),
            c4_repeats=2,
            c5_wraps=8,
            c6_context=4096,
            c6_batches=(1, 8),
            latency_prompt=512,
            latency_lengths=(16, 32, 64),
            c7_checkpoint=checkpoint_config(512, 8, 8),
        )
    return Plan(
        "cpu-full",
        SCALED_CPU,
        "float32",
        repeats=7,
        steps=2,
        c1_contexts=(512, 2048, 4096, 8192, 16384, 32768),
        c3_tokens=2048,
        c3_repeats=3,
        c3_all_logits=True,
        c4_tokens=(1024, 2048, 4096, 8192),
        c4_repeats=2,
        c5_wraps=16,
        c6_context=4096,
        c6_batches=(1, 2, 4, 8, 16),
        latency_prompt=2048,
        latency_lengths=(128, 256, 512, 1024),
        c7_checkpoint=checkpoint_config(768, 16, 12),
    )
