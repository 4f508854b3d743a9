"""One interface over both models: random decode state at a given context, a decode step, a prefill.

Decode states are filled with random values at length N instead of prefilling N tokens: the cost of a
step does not depend on the values (no data-dependent control flow in either model), and it keeps
contexts of 16K-32K affordable on a CPU. Each step feeds back the greedy token (argmax), as generation
does, so both loops pay the same sampling cost.

The baseline decodes from a ``transformers.StaticCache`` sized to the context of each measurement (HF's
static cache attends over its whole capacity under a mask, so a cache much larger than the context would
penalise it); in our measurements it was faster per step than the default DynamicCache, which copies its
K/V every step (torch.cat). Prefill uses the default DynamicCache (the fast causal SDPA path).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from sambay.generation import decode_one_token


@dataclass
class DecodeState:
    cache: object
    token: torch.Tensor  # (B,) the next input token
    pos: int  # its position


class SambaYDriver:
    name = "sambay"

    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.vocab = model.config.vocab_size

    def random_state(self, batch: int, context: int, capacity: int) -> DecodeState:
        """A cache holding ``context`` positions of random state, room for ``capacity`` in all."""
        cache = self.model.allocate_cache(batch, max(capacity, context + 1))
        g = torch.Generator(device=self.device).manual_seed(context)
        for layer in cache.layers:
            if layer is not None:
                for t in vars(layer).values():
                    t.normal_(generator=g)
        cache.seek(context)
        token = torch.randint(0, self.vocab, (batch,), device=self.device, generator=g)
        return DecodeState(cache, token, context)

    def step(self, state: DecodeState) -> torch.Tensor:
        logits = decode_one_token(self.model, state.token, state.cache)
        state.token = logits.argmax(-1)
        state.pos += 1
        return logits

    def prefill(self, ids: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """A fresh prefill of ``ids`` (B, T) into a new cache; returns the kept logits."""
        cache = self.model.allocate_cache(ids.shape[0], ids.shape[1])
        return self.model(ids, cache=cache, logits_to_keep=keep).logits


class Phi3Driver:
    name = "phi3"

    def __init__(self, model):
        import transformers

        self.tf = transformers
        self.model = model
        self.config = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.vocab = model.config.vocab_size
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.pass_cache_position = "cache_position" in params  # transformers 4.x needs it

    def _forward(self, ids: torch.Tensor, cache, pos0: int, keep: int):
        B, T = ids.shape
        kw = {
            self.cache_kw: cache,
            "use_cache": True,
            "logits_to_keep": keep,
            "position_ids": torch.arange(pos0, pos0 + T, device=self.device)[None].expand(B, -1),
        }
        if self.pass_cache_position:
            kw["cache_position"] = torch.arange(pos0, pos0 + T, device=self.device)
        return self.model(input_ids=ids, **kw).logits

    def random_state(self, batch: int, context: int, capacity: int) -> DecodeState:
        c = self.config
        cache = self.tf.StaticCache(config=c, max_cache_len=max(capacity, context + 1))
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        g = torch.Generator(device=self.device).manual_seed(context)
        pos = torch.arange(context, device=self.device)
        for i in range(c.num_hidden_layers):
            k = torch.randn(
                batch, c.num_key_value_heads, context, hd, device=self.device, dtype=self.dtype, generator=g
            )
            v = torch.randn(
                batch, c.num_key_value_heads, context, hd, device=self.device, dtype=self.dtype, generator=g
            )
            cache.update(k, v, i, {"cache_position": pos})
            del k, v
        token = torch.randint(0, self.vocab, (batch,), device=self.device, generator=g)
        return DecodeState(cache, token, context)

    def step(self, state: DecodeState) -> torch.Tensor:
        logits = self._forward(state.token[:, None], state.cache, state.pos, 1)[:, -1]
        state.token = logits.argmax(-1)
        state.pos += 1
        return logits

    def prefill(self, ids: torch.Tensor, keep: int = 1) -> torch.Tensor:
        try:
            cache = self.tf.DynamicCache(config=self.config)
        except TypeError:  # transformers 4.x: no config argument
            cache = self.tf.DynamicCache()
        return self._forward(ids, cache, 0, keep)
