"""Token generation on top of the static SambaYCache: prefill (with the YOCO skip), then one token per
step. The decode step branches on shapes and Python ints only (no .item(), no host sync), so it can be
compiled or graph-captured; the only sync per step is the EOS check that stopping needs.
"""

from __future__ import annotations

from typing import Any

import torch

from sambay.cache import SambaYCache


def sample_next(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row. logits: (B, V) -> (B,) int64."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0 when sampling, got {temperature}")
    scores = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_one_token(model, token: torch.Tensor, cache: SambaYCache, static: bool = False) -> torch.Tensor:
    """One decode step: token (B,) -> next-token logits (B, V). Updates ``cache`` in place.

    ``static=True`` takes the position from ``cache.pos`` (a device tensor) with shapes independent of it:
    the step to compile or capture in a CUDA graph. A replayed graph advances ``cache.pos`` itself; the
    caller then advances the Python count ``cache.length`` by one per replay."""
    return model(token[:, None], cache=cache, logits_to_keep=1, static=static).logits[:, -1]


def _emit(streamer: Any, tokens: torch.Tensor) -> None:
    if hasattr(streamer, "put"):
        streamer.put(tokens.cpu())
    else:
        streamer(tokens)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, streamer: Any = None,
             cache: SambaYCache | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after each (left-padded) prompt.

    Args:
        input_ids: (B, P) prompts, left-padded for batches of unequal lengths.
        attention_mask: (B, P), 0 at padding; None = no padding.
        do_sample, temperature, top_k, top_p, generator: sampling (greedy when do_sample is False).
        eos_token_id: id(s) that end a row; a finished row is padded with ``pad_token_id``
            (default: the config's pad id, else the first eos id). None = never stop early.
        streamer: a Hugging Face style streamer (``put``/``end``) or a callable, given each new token (B,).
        cache: an allocated SambaYCache to reuse (it is reset); default: a new one of size P + max_new_tokens.
    Returns:
        (B, P + n) token ids, n <= max_new_tokens (fewer only when every row finished).
    """
    B, P = input_ids.shape
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    if cache is None:
        cache = model.allocate_cache(B, P + max_new_tokens, device=input_ids.device)
    else:
        cache.reset()
    eos = None
    if eos_token_id is not None:
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           device=input_ids.device)
        if pad_token_id is None:
            pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else int(eos[0])
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids.cpu())
    out = [input_ids]
    if max_new_tokens > 0:
        logits = model(input_ids, attention_mask, cache=cache, logits_to_keep=1).logits[:, -1]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
            if eos is not None:
                token = torch.where(finished, torch.full_like(token, pad_token_id), token)
                finished |= torch.isin(token, eos)
            out.append(token[:, None])
            if streamer is not None:
                _emit(streamer, token)
            if step + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            logits = decode_one_token(model, token, cache)
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return torch.cat(out, dim=1)
