"""The causal LM over :class:`~sambay.model.SambaYModel`: :class:`SambaYForCausalLM` (a plain ``nn.Module``), and the
surface it shares with the transformers class ``sambay.hf_model.Phi4FlashForCausalLM`` (a ``PreTrainedModel``):
both inherit :class:`CausalLMMixin` (forward, loss, cache, checkpointing, saving) and
:class:`sambay.generation.SambaYGenerationMixin` (generate).

A class using the mixin provides ``self.model`` (SambaYModel), ``self.lm_head`` (nn.Linear) and
``self.sambay_config`` (the SambaYConfig the modules were built from).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sambay import quant
from sambay.cache import SambaYCache
from sambay.config import SambaYConfig
from sambay.generation import SambaYGenerationMixin
from sambay.layers import DiffAttentionCore, Mamba
from sambay.layers.linear import Linear
from sambay.model import SambaYModel

# The module that a saved checkpoint's ``auto_map`` names: transformers copies it out of the checkpoint directory
# and imports it under trust_remote_code=True, so any process with sambay installed loads the checkpoint through
# sambay's own classes (no code is copied: the file only imports them).
AUTO_MODULE = "modeling_sambay"
AUTO_MAP = {"AutoConfig": f"{AUTO_MODULE}.Phi4FlashConfig",
            "AutoModelForCausalLM": f"{AUTO_MODULE}.Phi4FlashForCausalLM"}
_AUTO_MODULE_SOURCE = '''"""Loads this checkpoint with sambay (pip install sambay):
AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) imports this file, which only re-exports
sambay's classes."""

from sambay.hf import Phi4FlashConfig
from sambay.hf_model import Phi4FlashForCausalLM

__all__ = ["Phi4FlashConfig", "Phi4FlashForCausalLM"]
'''
GENERATION_CONFIG = "generation_config.json"


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T_kept, V)
    loss: torch.Tensor | None = None
    cache: SambaYCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # N+1 tensors (B, T, C), with output_hidden_states=True

    def to_tuple(self) -> tuple:
        """The set fields in transformers' order (loss first), as its ModelOutput indexes them."""
        return tuple(v for v in (self.loss, self.logits, self.cache, self.hidden_states) if v is not None)

    def __getitem__(self, key: int | str):
        """out["logits"] or out[0] (the loss when there is one), as tools written for transformers (Trainer) read
        outputs."""
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


# A pytree node, so torch.export and tree utilities see its tensors; the cache (an object the call updated in
# place, not an output tensor) travels as the node's context.
torch.utils._pytree.register_pytree_node(
    CausalLMOutput,
    lambda o: ((o.logits, o.loss, o.hidden_states), o.cache),
    lambda children, cache: CausalLMOutput(*children[:2], cache=cache, hidden_states=children[2]),
    serialized_type_name="sambay.model.CausalLMOutput",
    to_dumpable_context=lambda cache: "null" if cache is None else _undumpable(cache),
    from_dumpable_context=lambda s: None,
)


def _undumpable(cache):
    raise TypeError("a CausalLMOutput holding a SambaYCache cannot be serialized; export the decode step with "
                    "sambay.compiled.export_decode_step, whose cache tensors are inputs")


def loss_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 ignore_index: int = -100) -> torch.Tensor:
    """The next-token targets (B, T-1) of labels (B, T): shifted by one, padded positions set to ``ignore_index``."""
    target = labels[:, 1:]
    if attention_mask is not None:
        target = target.masked_fill(attention_mask[:, -labels.shape[1]:][:, 1:] == 0, ignore_index)
    return target


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy over real target tokens (fp32, fp64 for fp64). logits (B, T, V), labels (B, T)."""
    target = loss_targets(labels, attention_mask, ignore_index)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=ignore_index)


def _mask_covers(attention_mask, labels: torch.Tensor) -> bool:
    """Whether ``attention_mask`` is None or a (B, >= T) tensor that loss_targets can align with labels (B, T)."""
    return attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
                                      and attention_mask.shape[0] == labels.shape[0]
                                      and attention_mask.shape[1] >= labels.shape[1])


def check_label_range(labels: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int,
                      ignore_index: int = -100) -> None:
    """Raise a ValueError naming ``labels``, the first out-of-range target, its position and the vocabulary size
    unless every target the loss reads (see ``loss_targets``) is in [0, vocab_size) or ``ignore_index``.

    Without it an out-of-range target is torch's "IndexError: Target 300 is out of bounds." on a CPU and a
    device-side assert (which ends the CUDA context) on a GPU. Its cost: one pass over the (B, T) labels (~13 us
    for 512 labels, ~45 us for 8 x 2048 on a CPU core) and, on an accelerator, one host sync per forward with labels,
    placed before this forward queues any work (like the input_ids range check right after it), so it stalls no
    model kernel of this call; never in decoding (no labels)."""
    target = loss_targets(labels, attention_mask, ignore_index)
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
    if not bool(bad.any()):
        return
    where = bad.nonzero()
    b, t = (int(i) for i in where[0])
    values = target[bad]
    raise ValueError(f"labels: expected token ids in [0, vocab_size={vocab_size}) or {ignore_index} (ignored), got "
                     f"{int(target[b, t])} at labels[{b}, {t + 1}] ({len(where)} target(s) out of range, from "
                     f"{int(values.min())} to {int(values.max())})")


def _offloaded_checkpoint(function, *args, device_type: str, **kwargs):
    """torch.utils.checkpoint with the saved layer inputs held in pinned host memory."""
    with torch.autograd.graph.save_on_cpu(pin_memory=True, device_type=device_type):
        return checkpoint(function, *args, **kwargs)


class CausalLMMixin:
    """forward (loss, inputs_embeds, hidden states), the static cache, activation checkpointing, embeddings and
    save_pretrained for a model holding ``model``/``lm_head``/``sambay_config``."""

    accepts_loss_kwargs = False  # Trainer: the loss is the mean over the batch's real tokens (no num_items_in_batch)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: SambaYCache | None = None, labels: torch.Tensor | None = None, logits_to_keep: int = 0,
                static: bool = False, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool | None = False, use_cache: bool | None = None,
                past_key_values: SambaYCache | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **unset) -> CausalLMOutput:
        """Args:
            input_ids: (B, T); or inputs_embeds: (B, T, C) in the model dtype (exactly one of the two).
            attention_mask: see SambaYModel.forward; cache: a SambaYCache to continue from and update, or None
                (``past_key_values``, its name before transformers 5, is accepted too).
            labels: (B, T) targets aligned with the inputs (shifted inside; -100 and padded positions are
                ignored). Needs logits for every position (logits_to_keep=0).
            logits_to_keep: return logits for the last k positions only (0 = all).
            static: the shape-static decode step (see SambaYModel.forward).
            output_hidden_states: also return the N+1 hidden states (HF convention, see SambaYModel.forward).
            use_cache: None (default) = decode state only when ``cache`` is given. The cache is static (its
                length is fixed when allocated), so True without a cache and False with one are errors.
            output_attentions, return_dict, unset: the plumbing that wrappers such as peft pass, accepted when
                unset (None/False; return_dict True).
        Returns:
            CausalLMOutput with logits (B, T_kept, V) in the model dtype and loss (fp32) if labels.
        """
        name = type(self).__name__
        given = sorted(k for k, v in unset.items() if v is not None and v is not False)
        if given:
            raise TypeError(f"{name}.forward does not support {given}")
        if output_attentions:
            raise NotImplementedError(f"{name}.forward: output_attentions (the attention kernels never materialise "
                                      "the probabilities)")
        if return_dict is False:
            raise NotImplementedError(f"{name}.forward: return_dict=False (the outputs index like tuples too)")
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise TypeError(f"{name}.forward: got both cache and past_key_values")
            if not isinstance(past_key_values, SambaYCache):
                raise TypeError(f"past_key_values: expected a SambaYCache (model.allocate_cache(...)), got "
                                f"{type(past_key_values).__name__}")
            cache = past_key_values
        if use_cache and cache is None:
            raise ValueError("use_cache=True: sambay's decode state is allocated once with its final length; pass "
                             "cache=model.allocate_cache(batch_size, max_length) (and use_cache=None), or generate()")
        if use_cache is False and cache is not None:
            raise ValueError("use_cache=False contradicts the cache passed; drop one of the two")
        x = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and isinstance(x, torch.Tensor):
            if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
                    or tuple(labels.shape) != tuple(x.shape[:2]):
                got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels)
                raise ValueError(f"labels: expected an integer tensor of shape {tuple(x.shape[:2])} (the inputs' "
                                 f"batch and tokens; -100 = ignored), got {got}")
        if labels is not None and x is not None and logits_to_keep not in (0, x.shape[1]):
            raise ValueError(f"labels need logits at every position: expected logits_to_keep=0, got {logits_to_keep}")
        if labels is not None and isinstance(x, torch.Tensor) and _mask_covers(attention_mask, labels) \
                and not torch.compiler.is_compiling():  # (a malformed mask: the model's error, below)
            check_label_range(labels, attention_mask, self.lm_head.out_features)
        output_hidden_states = bool(output_hidden_states)
        out = self.model(input_ids, attention_mask, cache, logits_to_keep, static, inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states)
        h, hidden = out if output_hidden_states else (out, None)
        logits = self.lm_head(h)
        loss = None if labels is None else causal_lm_loss(logits, labels, attention_mask)
        return CausalLMOutput(logits=logits, loss=loss, cache=cache, hidden_states=hidden)

    def allocate_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> SambaYCache:
        """Allocate the static decode state for ``batch_size`` sequences of up to ``max_length`` tokens."""
        w = self.model.embed_tokens.weight
        return SambaYCache(self.sambay_config, batch_size, max_length, dtype or w.dtype, device or w.device)

    def set_backend(self, backend: str = "auto") -> None:
        """Choose the implementations of every op of every layer: one of ``sambay.kernels.BACKENDS``.

        "auto": the fast path where the tensors' device has it (Triton, mamba_ssm, causal_conv1d, flash_attn on
        CUDA), decided per call, else the plain-PyTorch twin; "torch": the twins everywhere; "cuda": insist on
        the fast paths (an op that cannot take one raises, saying why). On a CUDA model this also runs the
        packages' availability probes now, outside any compiled region."""
        from sambay.kernels import BACKENDS, active_backends
        from sambay.layers import BACKEND_LAYERS

        if backend not in BACKENDS:
            raise ValueError(f"backend: expected 'auto' or 'torch' (or 'cuda' to insist on the fast paths), "
                             f"one of {BACKENDS}; got {backend!r}")
        for m in self.modules():
            if isinstance(m, BACKEND_LAYERS):
                m.backend = backend
        if backend != "torch":
            active_backends(self.model.embed_tokens.weight.device)

    def quantize(self, weights: str, group_size: int | None = None, activations: str | None = None):
        """Quantize the hot-path linears in place: ``"int8"`` (per output channel) or ``"int4"`` (groups of
        ``group_size`` input columns, default 128; a linear it does not divide stays dense); ``activations="int8"``
        also quantizes each activation row to 8 bits per block of 32 before those linears. Returns self;
        ``config.quantization_config`` records what was quantized, and save_pretrained writes it. See sambay.quant."""
        from sambay.quant import quantize_model

        quantize_model(self, weights, group_size, activations)
        return self

    def set_activations(self, activations: str | None):
        """A quantized model's activation mode: None (weight-only) or "int8" (8 bits per block of 32). Returns
        self. See sambay.quant.set_activations."""
        from sambay.quant import set_activations

        set_activations(self, activations)
        return self

    # ---- activation checkpointing (the transformers 5 entry points) ------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute decoder layers' activations in backward (same gradients, less memory).

        Args:
            activation_checkpointing_kwargs: passed to ``torch.utils.checkpoint.checkpoint``
                (default ``{"use_reentrant": False}``).
            every_n_layers: checkpoint layers 0, n, 2n, ... only (1 = every layer).
            offload: keep the checkpointed layers' saved inputs in pinned host memory (a no-op on CPU).
        """
        n = every_n_layers
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"every_n_layers: expected an integer >= 1, got {n!r}")
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        device_type = self.model.embed_tokens.weight.device.type
        if offload and device_type != "cpu":
            fn = functools.partial(_offloaded_checkpoint, device_type=device_type, **kwargs)
        else:
            fn = functools.partial(checkpoint, **kwargs)
        self.model.checkpoint_fn, self.model.checkpoint_every = fn, n
        self.model.gradient_checkpointing = True

    def activation_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The older name, as transformers and peft call it (``every_n_layers``, ``offload`` as keywords)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    # ---- embeddings -----------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # ---- saving ---------------------------------------------------------------------------------
    def _save(self, directory, config, generation_config: dict, state_dict=None, max_shard_size="5GB",
              check_finite: bool = True) -> None:
        """Write the released layout (config.json + safetensors, by sambay.loading) plus generation_config.json
        and the auto_map module. ``config``: the SambaYConfig to write; ``state_dict``: weights to save instead of
        this model's own parameters (what Trainer passes)."""
        extra = {k: v for k, v in config.extra.items() if k not in ("auto_map", "transformers_version")}
        extra["auto_map"] = dict(AUTO_MAP)
        if "transformers" in sys.modules:  # a version field would otherwise claim a writer that did not write it
            extra["transformers_version"] = sys.modules["transformers"].__version__
        with torch.device("meta"):  # a shell over this model's modules, with the config to write
            shell = SambaYForCausalLM(_with_extra(config, extra))
        if state_dict is None:
            shell.model, shell.lm_head = self.model, self.lm_head
        else:
            shell.load_state_dict(state_dict, strict=True, assign=True)
            shell.tie_weights()
        from sambay import loading  # the file modules import safetensors: on first use only

        files = {f"{AUTO_MODULE}.py": _AUTO_MODULE_SOURCE,
                 GENERATION_CONFIG: json.dumps(generation_config, indent=2, sort_keys=True) + "\n"}
        loading.save_pretrained(shell, directory, max_shard_size=max_shard_size, check_finite=check_finite,
                                files=files)


def _with_extra(config, extra: dict):
    return dataclasses.replace(config, extra=extra)


def read_generation_config(directory) -> dict:
    """The checkpoint's generation_config.json as a dict ({} when there is none)."""
    from sambay.checkpoint import probe_path  # the file modules import safetensors: on first use only

    path = Path(directory) / GENERATION_CONFIG
    if probe_path(path, "the checkpoint's generation config", "file") is None:  # unreadable: an OSError naming it
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


class SambaYForCausalLM(CausalLMMixin, SambaYGenerationMixin, nn.Module):
    """SambaY with a (tied) LM head. Parameter names equal the checkpoint keys. forward, generate, the cache,
    checkpointing and saving come from the mixins (sambay.lm, sambay.generation), shared with the transformers
    class sambay.hf_model.Phi4FlashForCausalLM."""

    def __init__(self, config: SambaYConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.model = SambaYModel(config, device=device, dtype=dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        # generation_config.json of the checkpoint (a dict of the keys it sets): generate()'s defaults.
        self.generation_config: dict = {}
        self.name_or_path = ""
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()
        if config.quantization_config is not None:  # on meta: empty QuantLinears for the loader to fill
            quant.convert(self, config.quantization_config)

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
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # a quantized head is a copy
            self.lm_head.weight = self.model.embed_tokens.weight

    def _set_quantization_config(self, qc) -> None:
        self.config = self.model.config = dataclasses.replace(self.config, quantization_config=qc)

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

    # ---- loading and saving (the logic lives in sambay.loading and sambay.checkpoint) -----------
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, *, quantize: str | None = None,
                        group_size: int | None = None, check_finite: bool = True,
                        activations: str | None = None) -> SambaYForCausalLM:
        """A checkpoint directory or hub id; ``generation_config.json``, if present, sets generate()'s defaults.
        quantize: "int8" or "int4" (group_size, default 128) quantizes the linears while loading (see sambay.quant);
        a checkpoint saved quantized loads quantized without it. activations="int8": 8-bit activations before
        the quantized linears (a mode of the quantized weights, see sambay.quant).
        check_finite: refuse NaN/inf weights, naming the tensor (one sum per tensor, ~0.1-0.25 s/GB)."""
        from sambay import loading  # the file modules import safetensors: on first use only

        directory = loading.resolve_checkpoint(path)
        model = loading.from_pretrained(directory, cls, dtype=dtype, device=device, quantize=quantize,
                                        group_size=group_size, check_finite=check_finite,
                                        activations=activations)
        model.generation_config = read_generation_config(directory)
        model.name_or_path = str(path)
        return model

    def save_pretrained(self, directory, max_shard_size: int | str = "5GB", *, check_finite: bool = True) -> None:
        """config.json + safetensors (the released layout), generation_config.json, and ``modeling_sambay.py``
        named by config.json's auto_map (see sambay.lm). check_finite: refuse to save NaN/inf weights."""
        c = self.config
        generation = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
                      **self.generation_config}
        self._save(directory, c, generation, max_shard_size=max_shard_size, check_finite=check_finite)
