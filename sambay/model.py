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
from sambay.generation import SambaYGenerationMixin
from sambay.kernels.reference import f32
from sambay.layers import GMU, MLP, Attention, AttnCall, CrossAttention, DiffAttentionCore, Mamba
from sambay.lm import CausalLMMixin, CausalLMOutput, causal_lm_loss, read_generation_config
from sambay.masks import prefix_plan, ring_plan, sliding_plan, static_plans

__all__ = ["Block", "CausalLMOutput", "SambaYForCausalLM", "SambaYModel", "causal_lm_loss"]


@dataclass
class _Context:
    """What one forward call shares between layers (built once, read by every Block)."""

    dtype: torch.dtype
    p0: int  # position of the first new token
    cache: SambaYCache | None
    pad: torch.Tensor | None  # (B, T) bool real-token flags of the new tokens; None = no padding
    keep: int  # the last ``keep`` positions are the ones whose logits are wanted
    sliding: list[AttnCall]
    kept: list[AttnCall]  # queries at the kept positions over every key so far (full and cross layers)
    pad_kept: torch.Tensor | None = None  # pad for the kept positions
    pos: torch.Tensor | None = None  # (1,) position of the token, in the static decode step only
    memory: torch.Tensor | None = None  # (B, T, E) from the memory layer
    kv: tuple[torch.Tensor, torch.Tensor] | None = None  # shared K/V from the full-attention layer


class Block(nn.Module):
    """LayerNorm -> mixer -> residual -> LayerNorm -> SwiGLU MLP -> residual. The residual stream is
    fp32; each sublayer input is cast to the model dtype first (HF's rounding points)."""

    def __init__(self, config: SambaYConfig, index: int, device=None, dtype=None):
        super().__init__()
        c, kw = config, {"device": device, "dtype": dtype}
        self.index, self.role = index, c.layer_types[index]
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, **kw)
        if self.role == "mamba":
            self.attn = Mamba(c.hidden_size, c.d_inner, c.mamba_d_state, c.mamba_d_conv, c.dt_rank,
                              c.mamba_conv_bias, c.mamba_proj_bias, memory_producer=index == c.memory_layer, **kw)
        elif self.role == "gmu":
            self.attn = GMU(c.hidden_size, c.d_inner, **kw)
        elif self.role == "cross_attention":
            self.attn = CrossAttention(c.hidden_size, c.num_attention_heads, c.head_dim, c.lambda_init(index), **kw)
        else:
            self.attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                  c.lambda_init(index), **kw)
        if isinstance(self.attn, (Attention, CrossAttention)):
            self.attn.inner_cross_attn.dropout = c.attention_dropout
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, **kw)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, **kw)
        self.resid_dropout = nn.Dropout(c.resid_pdrop)
        self.is_memory_layer = index == c.memory_layer

    def forward(self, h: torch.Tensor, ctx: _Context):
        """h: (B, T, C) fp32 residual stream -> (h (B, T, C) fp32, export). ``export`` is the memory on the
        memory layer, the shared (k, v) on the KV layer, else None. A block never writes into ``ctx``:
        wrappers such as FSDP2's fully_shard may hand it a copy (they rebuild dataclass arguments)."""
        a = self.input_layernorm(h.to(ctx.dtype))
        out, export = self._mix(a, ctx)
        h = h[:, h.shape[1] - out.shape[1]:]  # the full-attention layer returns the kept positions only
        h = h + self._drop(out)
        return h + self._drop(self.mlp(self.post_attention_layernorm(h.to(ctx.dtype)))), export

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(x) if self.training and self.resid_dropout.p > 0 else x

    def _mix(self, a: torch.Tensor, ctx: _Context):
        """Returns (mixer output, export): see forward."""
        state = ctx.cache.layers[self.index] if ctx.cache is not None else None
        role, T = self.role, a.shape[1]
        if role == "mamba":
            if state is not None and T == 1:
                out, memory = self.attn.step(a, state, ctx.pad)
            else:
                out, memory = self.attn(a, ctx.pad, state, fresh=ctx.p0 == 0)
            return out, memory if self.is_memory_layer else None
        if role == "gmu":
            return self.attn(a, ctx.memory), None
        if role == "cross_attention":
            return self.attn(a, *ctx.kv, ctx.kept, ctx.pad_kept), None
        q, k, v = self.attn.project(a)
        if role == "full_attention":
            if state is not None:
                k, v = state.write(k, v, ctx.p0) if ctx.pos is None else state.write_at(k, v, ctx.pos)
            # Its K/V are needed at every position, its output only where the cross-decoder runs: the
            # first step of the YOCO prefill skip.
            return self.attn(q[:, T - ctx.keep:], k, v, ctx.kept, ctx.pad_kept), (k, v)
        # sliding window
        if state is not None:
            if T == 1:  # decode: write into the ring first, then attend over the ring in place
                if ctx.pos is None:
                    state.write(k, v, ctx.p0)
                else:
                    state.write_at(k, v, ctx.pos)
                k, v = state.k, state.v
            else:
                new_k, new_v = k, v
                if ctx.p0 > 0:  # earlier chunks: the ring's keys come first (sliding_plan's layout)
                    k, v = torch.cat([state.k, k], dim=3), torch.cat([state.v, v], dim=2)
                state.write(new_k, new_v, ctx.p0)
        return self.attn(q, k, v, ctx.sliding, ctx.pad), None


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
                covers every position so far); 1 = real token, 0 = left padding.
            cache: continue from and update this SambaYCache in place.
            logits_to_keep: run the cross-decoder and final norm on the last k positions only (0 = all).
            static: one decode token whose position is read from ``cache.pos`` (a device tensor) and whose
                tensor shapes do not depend on it, so the step can be captured in a CUDA graph or compiled
                once. Attends over all ``max_length`` slots (masked), so it only pays off on a GPU.
            output_hidden_states: also return the hidden states.
        Returns:
            h: (B, T_kept, C) final-norm output in the model dtype; with output_hidden_states, (h, hidden_states):
            N+1 tensors in the model dtype (HF convention: the embeddings, the output of each layer, the last
            replaced by h); the cross-decoder's have only the kept positions.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("SambaYModel.forward: expected exactly one of input_ids and inputs_embeds, got "
                             + ("both" if input_ids is not None else "neither"))
        x = input_ids if input_ids is not None else inputs_embeds
        B, T = x.shape[:2]
        dtype, device = self.embed_tokens.weight.dtype, x.device
        C = self.config.hidden_size
        if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[2] != C):
            raise ValueError(f"inputs_embeds: expected shape (B, T, {C}), got "
                             f"{tuple(inputs_embeds.shape)}")
        p0 = 0 if cache is None else cache.length
        if cache is not None:
            cache.check(B, T, dtype, device)
        keep = T if logits_to_keep <= 0 or logits_to_keep >= T else logits_to_keep
        if static:
            ctx = self._static_context(x, attention_mask, cache, dtype)
        else:
            valid = self._valid(attention_mask, cache, B, T, p0, device)
            pad = None if valid is None else valid[:, p0:p0 + T]
            ctx = _Context(dtype, p0, cache, pad, keep, self._sliding_plan(cache, p0, T, valid, B, device),
                           prefix_plan(p0, T, keep, valid, B, device),
                           pad_kept=None if pad is None else pad[:, T - keep:])
        emb = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.to(dtype)
        h = f32(emb)  # the residual stream is fp32 from layer 0 on
        hidden = [emb] if output_hidden_states else None
        for block in self.layers:
            if block.index == self.config.first_cross_layer:  # YOCO prefill skip: only the kept positions
                ctx.memory = ctx.memory[:, T - keep:]
            if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                    and block.index % self.checkpoint_every == 0):
                h, export = self.checkpoint_fn(block, h, ctx)
            else:
                h, export = block(h, ctx)
            if hidden is not None:
                hidden.append(h.to(dtype))
            if block.index == self.config.memory_layer:  # the model, not the block, fills ctx (see Block)
                ctx.memory = export
            elif block.index == self.config.kv_layer:
                ctx.kv = export
        if cache is not None:
            cache.length = p0 + T
            if static:
                cache.pos += 1  # a device op: replays with a captured graph
            else:
                cache.pos.fill_(p0 + T)
        out = self.final_layernorm(h[:, h.shape[1] - keep:].to(dtype))
        if hidden is None:
            return out
        hidden[-1] = out
        return out, tuple(hidden)

    def _valid(self, attention_mask, cache, B, T, p0, device) -> torch.Tensor | None:
        """(B, p0+T) bool real-token flags by position, or None when nothing is padded."""
        expected = (B, p0 + T)
        if attention_mask is not None and tuple(attention_mask.shape) != expected:
            where = f"cache.length ({p0}) + new tokens ({T})" if cache is not None else "input_ids"
            raise ValueError(f"attention_mask: expected shape {expected} ({where}), got {tuple(attention_mask.shape)}")
        new = None if attention_mask is None else attention_mask[:, p0:].to(device=device, dtype=torch.bool)
        padded = new is not None and not bool(new.all())  # one host sync, only when a mask is given
        if cache is None:
            return new if padded else None
        cache.valid[:, p0:p0 + T] = True if new is None else new
        cache.has_padding = cache.has_padding or padded
        return cache.valid[:, :p0 + T] if cache.has_padding else None

    def _static_context(self, input_ids, attention_mask, cache, dtype) -> _Context:
        B, T = input_ids.shape[:2]
        if cache is None or T != 1 or attention_mask is not None:
            raise ValueError(f"static=True is the one-token decode step: expected a cache, input_ids of shape "
                             f"(B, 1) and no attention_mask (the cache keeps the padding), got cache="
                             f"{'set' if cache is not None else None}, input_ids {tuple(input_ids.shape)}, "
                             f"attention_mask {'set' if attention_mask is not None else None}")
        pos = cache.pos
        cache.valid.index_fill_(1, pos, True)
        ring = None
        if "sliding_attention" in self.config.layer_types:
            ring = cache.layers[self.config.layer_types.index("sliding_attention")].positions(pos)
        sliding, kept = static_plans(pos, ring, cache.valid, B)
        return _Context(dtype, cache.length, cache, None, 1, sliding, kept, pos=pos)

    def _sliding_plan(self, cache, p0, T, valid, B, device) -> list[AttnCall]:
        W = self.config.sliding_window
        ring = None
        if cache is not None:
            ring = cache.layers[self.config.layer_types.index("sliding_attention")]
        if ring is not None and T == 1:
            return ring_plan(ring.positions(p0), p0 >= ring.slots - 1, valid, B)
        ring_pos = ring.positions(p0 - 1) if ring is not None and p0 > 0 else None
        return sliding_plan(p0, T, W, ring_pos, valid, B, device)


class SambaYForCausalLM(CausalLMMixin, SambaYGenerationMixin, nn.Module):
    """SambaY with a (tied) LM head. Parameter names equal the checkpoint keys. forward, generate, the cache,
    checkpointing and saving come from the mixins (sambay.lm, sambay.generation), shared with the transformers
    class sambay.hf_model.Phi4FlashForCausalLM."""

    def __init__(self, config: SambaYConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.model = SambaYModel(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        # generation_config.json of the checkpoint (a dict of the keys it sets): generate()'s defaults.
        self.generation_config: dict = {}
        self.name_or_path = ""
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @property
    def sambay_config(self) -> SambaYConfig:
        return self.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random initialisation for training from scratch (checkpoints overwrite all of it)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.LayerNorm, DiffAttentionCore)):
                m.reset_parameters()
        for m in self.modules():  # Mamba's own recipe (conv, dt, A, D) after the generic Linear init
            if isinstance(m, Mamba):
                m.reset_parameters()
                for lin in (m.in_proj, m.x_proj, m.out_proj):
                    nn.init.normal_(lin.weight, std=std)

    # ---- loading and saving (the logic lives in sambay.loading) -------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> SambaYForCausalLM:
        """A checkpoint directory or hub id; ``generation_config.json``, if present, sets generate()'s defaults."""
        from sambay.loading import from_pretrained, resolve_checkpoint

        directory = resolve_checkpoint(path)
        model = from_pretrained(directory, dtype=dtype, device=device, cls=cls)
        model.generation_config = read_generation_config(directory)
        model.name_or_path = str(path)
        return model

    def save_pretrained(self, directory, max_shard_size: int | str = "5GB") -> None:
        """config.json + safetensors (the released layout), generation_config.json, and ``modeling_sambay.py``
        named by config.json's auto_map (see sambay.lm)."""
        c = self.config
        generation = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
                      **self.generation_config}
        self._save(directory, c, generation, max_shard_size=max_shard_size)
