"""SambaY decoder-hybrid-decoder: the only file that knows the data flow between layers.

    self-decoder   0 .. N/2+1 : Mamba / sliding-window diff-attention alternating; layer N/2 (Mamba)
                                exports its ungated scan output as the memory; layer N/2+1 (full
                                diff-attention) exports its K/V as the one shared KV cache.
    cross-decoder  N/2+2 .. N-1: GMU (gated by the memory) / cross diff-attention (own Q, shared K/V).

The cross-decoder keeps no state, so it only runs on the positions whose logits are wanted
(``logits_to_keep``), and the full-attention layer computes its output there only (its K/V are still
written for every position): the YOCO prefill skip, exact by construction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sambay.cache import SambaYCache
from sambay.config import SambaYConfig
from sambay.inputs import check_keep, check_mask, embed
from sambay.layers import MLP, AttnCall
from sambay.masks import prefix_plan, static_plans, window_plan
from sambay.roles import ROLES
from sambay.states import KeyColumns

__all__ = ["Block", "SambaYModel", "Step"]


@dataclass(frozen=True)
class Step:
    """What one forward call shares between layers: built once, read only (wrappers such as FSDP2's
    fully_shard may hand a block a copy, so nothing may be written into it)."""

    dtype: torch.dtype  # the model dtype: every sublayer input is cast to it
    cache: SambaYCache | None
    at: int | torch.Tensor  # position of the first new token; the (1,) device tensor cache.pos in the static step
    fresh: bool  # nothing is cached yet: the Mamba layers start from zero states
    keep: int  # the last ``keep`` positions are the ones whose logits are wanted (the cross-decoder's rows)
    pad: torch.Tensor | None  # (B, T) real-token flags of the new tokens; None = no padding
    pad_kept: torch.Tensor | None  # the same for the kept rows
    sliding: list[AttnCall]  # the plan of every sliding-window layer
    kept: list[AttnCall]  # queries at the kept rows over every key so far (the full and cross layers)

    def state(self, index: int):
        return None if self.cache is None else self.cache.layers[index]


class Block(nn.Module):
    """LayerNorm -> mixer -> residual -> LayerNorm -> SwiGLU MLP -> residual. The residual stream is
    fp32; each sublayer input is cast to the model dtype first (HF's rounding points)."""

    def __init__(self, config: SambaYConfig, index: int, device=None, dtype=None):
        super().__init__()
        c, kw = config, {"device": device, "dtype": dtype}
        self.index, self.role = index, c.layer_types[index]
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, **kw)
        self.attn = ROLES[self.role].build(c, index, kw)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, **kw)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, **kw)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)

    def forward(self, h: torch.Tensor, step: Step, memory: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, keep: int | None = None):
        """h: (B, T, C) fp32 residual stream -> (h (B, keep, C) fp32, what the mixer exports).

        memory, kv: the cross-decoder's inputs (GMU, cross-attention). keep: compute the output for the last
        ``keep`` positions only (the YOCO cut at the shared-KV layer, which still reads all T); default T.
        The mixer is called as its role (:data:`sambay.roles.ROLES`) says, with the inputs it names."""
        keep = h.shape[1] if keep is None else keep
        a = self.input_layernorm(h.to(step.dtype))
        role = ROLES[self.role]
        given = {"step": step, "state": step.state(self.index), "memory": memory, "kv": kv, "keep": keep}
        out, export = role.mix(self.attn, a, **{name: given[name] for name in role.inputs})
        h = h[:, h.shape[1] - keep:] + self._drop(out)
        return h + self._drop(self.mlp(self.post_attention_layernorm(h.to(step.dtype)))), export

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(x) if self.training and self.resid_dropout.p > 0 else x


class SambaYModel(nn.Module):
    def __init__(self, config: SambaYConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(Block(config, i, **kw) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.gradient_checkpointing = False
        # Set by activation_checkpointing_enable (sambay.lm): the checkpoint call and which layers it wraps.
        self.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
        self.checkpoint_every = 1

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: SambaYCache | None = None, logits_to_keep: int = 0, static: bool = False,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool = False):
        """Args:
            input_ids: (B, T) new tokens (the whole sequence without a cache; a continuation with one).
            inputs_embeds: (B, T, C) instead of input_ids (exactly one of the two): what embed_tokens would give.
            attention_mask: (B, T) without a cache, (B, cache.length + T) with one (HF convention: it
                covers every position so far); 1 = real token, 0 = padding. With a cache (generation) the
                padding must be on the left; without one, left or right (each row one run of real tokens).
            cache: continue from and update this SambaYCache in place.
            logits_to_keep: run the cross-decoder and final norm on the last k positions only (0 = all).
            static: one decode token whose position is read from ``cache.pos`` (a device tensor) and whose
                tensor shapes do not depend on it, so the step can be captured in a CUDA graph or compiled
                once. Attends over all ``max_length`` slots (masked), so it only pays off on a GPU.
            output_hidden_states: also return the N+1 hidden states in the model dtype (HF convention): the
                embeddings, then the residual stream after each layer, the last replaced by the final-norm output.
                Entries from the shared-KV layer on have the kept rows only.
        Returns:
            (B, T_kept, C) final-norm output in the model dtype; with output_hidden_states, (that, hidden_states).
        """
        c = self.config
        h, B, T = embed(self.embed_tokens, input_ids, inputs_embeds)
        keep = check_keep(logits_to_keep, T)
        step = self._static_step(B, T, attention_mask, cache) if static else \
            self._step(B, T, attention_mask, cache, keep, h.device)
        hidden = [h.to(step.dtype)] if output_hidden_states else None
        M = c.memory_layer
        # Self-decoder: Mamba / sliding-window attention, each layer with its own state.
        for i in range(M):
            h = self._layer(self.layers[i], h, step, hidden)[0]
        h, memory = self._layer(self.layers[M], h, step, hidden)  # the memory: its ungated scan output
        # The shared-KV layer writes K/V for every position; from its output on, only the kept rows exist.
        # This is the YOCO prefill skip: the cross-decoder keeps no state, so it runs on those rows only.
        h, kv = self._layer(self.layers[c.kv_layer], h, step, hidden, keep=keep)
        memory = memory[:, T - keep:]
        # Cross-decoder: stateless GMUs (gated by the memory) and cross-attentions (reading the shared K/V).
        for i in range(c.first_cross_layer, c.num_hidden_layers):
            h = self._layer(self.layers[i], h, step, hidden, memory, kv)[0]
        if cache is not None and static:
            cache.advance_static()
        elif cache is not None:
            cache.advance(T)
        out = self.final_layernorm(h.to(step.dtype))
        if hidden is None:
            return out
        hidden[-1] = out
        return out, tuple(hidden)

    def _layer(self, block: Block, h, step: Step, hidden: list | None, memory=None, kv=None, keep=None):
        if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                and block.index % self.checkpoint_every == 0):
            h, export = self.checkpoint_fn(block, h, step, memory, kv, keep)
        else:
            h, export = block(h, step, memory, kv, keep)
        if hidden is not None:
            hidden.append(h.to(step.dtype))
        return h, export

    # ---- the per-call step: padding, attention plans (the inputs are checked by sambay.inputs) ---------
    def _step(self, B: int, T: int, attention_mask, cache: SambaYCache | None, keep: int, device) -> Step:
        dtype = self.embed_tokens.weight.dtype
        p0 = 0
        if cache is not None:
            cache.check(self.config, B, T, dtype, device)
            p0 = cache.length
        new, padded = check_mask(attention_mask, B, p0, T, cache is not None, device)
        if cache is None:
            valid = new if padded else None
        else:
            valid = cache.begin(T, new, padded)  # (B, p0+T) or None; from here on the cache is in flight
        pad = None if valid is None else valid[:, p0:p0 + T]
        ring = None if cache is None else cache.ring
        cols = KeyColumns(None, 0, T) if ring is None else ring.columns(p0, T)
        sliding = window_plan(cols, self.config.sliding_window, valid, B, device) \
            if "sliding_attention" in self.config.layer_types else []
        return Step(dtype, cache, p0, p0 == 0, keep, pad, None if pad is None else pad[:, T - keep:], sliding,
                    prefix_plan(p0, T, keep, valid, B, device))

    def _static_step(self, B: int, T: int, attention_mask, cache: SambaYCache | None) -> Step:
        if cache is None or T != 1 or attention_mask is not None:
            raise ValueError(f"static=True is the one-token decode step: expected a cache, input_ids of shape "
                             f"(B, 1) and no attention_mask (the cache keeps the padding), got cache="
                             f"{'set' if cache is not None else None}, {T} tokens, "
                             f"attention_mask {'set' if attention_mask is not None else None}")
        dtype = self.embed_tokens.weight.dtype
        cache.check(self.config, B, None, dtype, self.embed_tokens.weight.device)
        if not torch.compiler.is_compiling():  # compiled: sambay.compiled checks before the call, outside the graph
            cache.check_static_room()
        pos = cache.begin_static()
        ring = cache.ring
        sliding, kept = static_plans(pos, None if ring is None else ring.positions(pos), cache.valid, B)
        return Step(dtype, cache, pos, False, 1, None, None, sliding, kept)
