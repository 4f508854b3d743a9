"""Shared by the vLLM plugin tests: the random-weight checkpoint, engines, and sambay's own answers."""

from __future__ import annotations

import contextlib
import gc
import math

import torch
from helpers import random_model

# A head size the CPU attention backend accepts: the plugin's paged heads are 2 * head_dim = 64. GQA (4 query
# heads, 2 K/V heads), 8 layers (every role), a window of 16 keys, so 40-token prompts go past it.
CONFIG = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 8,
          "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 16}
MAX_MODEL_LEN = 256
# Prompts of different lengths: shorter than the window, past it, and past the chunked-prefill budget (CHUNK).
PROMPTS = [[7, 3, 200, 41, 5], list(range(100, 140)), [9] * 3 + list(range(300, 321)), list(range(1, 70, 2)), [42]]
CHUNK = 16


def sambay_model(seed: int = 0):
    return random_model(seed=seed, **CONFIG)


def save_checkpoint(directory) -> None:
    sambay_model().save_pretrained(directory)


def engine(directory, chunked: bool = True, fast_prefill: bool = False, **kwargs):
    """An in-process vLLM engine on the checkpoint, fp32. chunked: prompts are split into chunks of CHUNK tokens
    (the Mamba state and the paged K/V continue across chunks); else each prompt is scheduled whole."""
    from vllm import LLM

    budget = {"enable_chunked_prefill": True, "max_num_batched_tokens": CHUNK} if chunked else \
        {"enable_chunked_prefill": False, "max_num_batched_tokens": MAX_MODEL_LEN}
    return LLM(model=str(directory), dtype="float32", max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True,
               max_num_seqs=8, seed=0, kv_sharing_fast_prefill=fast_prefill, **budget, **kwargs)


def close(llm) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def greedy(max_tokens: int, prompt_logprobs: bool = False):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          prompt_logprobs=0 if prompt_logprobs else None)


def tokens_prompt(ids):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


@torch.no_grad()
def sambay_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def sambay_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """(P-1,) log p(prompt[t] | prompt[:t]) for t = 1..P-1 from sambay's full forward (fp64 log_softmax)."""
    logits = model(torch.tensor([prompt])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]


def vllm_prompt_logprobs(output) -> torch.Tensor:
    """(P-1,) the prompt logprobs of a vLLM RequestOutput, in the same order."""
    ids = output.prompt_token_ids
    values = [entry[ids[t]].logprob for t, entry in enumerate(output.prompt_logprobs) if t > 0]
    return torch.tensor(values, dtype=torch.float64)


def fp32_logprob_tolerance(reference: torch.Tensor) -> float:
    """fp32 rounding bound for log-probabilities computed through 8 layers twice (two implementations whose
    attention kernels sum in different orders): 1e-4 relative to the largest magnitude, as the project's fp32
    tolerance, with a floor for values near 0."""
    return 1e-4 * max(1.0, math.ceil(reference.abs().max().item()))
