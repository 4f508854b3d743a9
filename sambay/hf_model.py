"""The transformers model class: sambay's causal LM behind the ``PreTrainedModel`` interface.

``Phi4FlashForCausalLM`` is built from the same mixins as :class:`sambay.SambaYForCausalLM` (forward, generate,
cache, checkpointing, saving: :mod:`sambay.lm`, :mod:`sambay.generation`); its submodules are sambay's own
(``model``, ``lm_head``), so parameter names equal the checkpoint keys, and loading and saving go through
:mod:`sambay.loading` (the strict loader, the released layout). What this class adds is the transformers side:
the config object, ``generation_config``, the ``from_pretrained`` / ``save_pretrained`` arguments other tools
pass, and transformers' output types. Importing this module imports transformers' modeling code (seconds);
:mod:`sambay.hf` stays light.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from sambay import hf
from sambay.config import SambaYConfig
from sambay.generation import SambaYGenerationMixin, with_cache
from sambay.hf import Phi4FlashConfig
from sambay.lm import CausalLMMixin, SambaYForCausalLM, read_generation_config

__all__ = ["Phi4FlashForCausalLM"]

# from_pretrained arguments that transformers, lm-eval and the hub plumbing pass and that do not change what
# sambay loads from a local directory: accepted whatever their value.
_IGNORED = {"trust_remote_code", "_from_auto", "adapter_kwargs", "revision", "cache_dir", "token", "proxies",
            "local_files_only", "force_download", "code_revision", "low_cpu_mem_usage", "use_safetensors",
            "attn_implementation", "_commit_hash", "offload_folder", "_from_pipeline", "user_agent"}
# Arguments sambay cannot honour: accepted at the value that means "not used", anything else is a TypeError.
_UNSET = {"gguf_file": (None,), "max_memory": (None,), "quantization_config": (None,), "tp_plan": (None,),
          "tp_size": (None,), "device_mesh": (None,), "distributed_config": (None,), "key_mapping": (None,),
          "state_dict": (None,), "variant": (None,), "output_loading_info": (False,), "from_tf": (False,),
          "from_flax": (False,), "ignore_mismatched_sizes": (False,), "offload_state_dict": (None, False),
          "offload_buffers": (False,), "load_in_8bit": (False,), "load_in_4bit": (False,), "use_kernels": (False,),
          "subfolder": ("", None), "weights_only": (True,), "experts_implementation": (None,)}


def _one_device(device_map):
    """The device of a single-device ``device_map`` (None, "auto", a device, or {"": device})."""
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise TypeError(f"device_map: sambay loads onto one device; expected {{'': device}} or one device, got "
                            f"{device_map!r}")
        device_map = devices.pop()
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_map is not None and not isinstance(device_map, (str, int, torch.device)):
        raise TypeError(f"device_map: expected one device (str, int, torch.device or {{'': device}}), got "
                        f"{device_map!r}")
    return device_map


class Phi4FlashForCausalLM(CausalLMMixin, SambaYGenerationMixin, PreTrainedModel):
    """sambay's causal LM as a transformers ``PreTrainedModel`` (config: :class:`sambay.hf.Phi4FlashConfig`).
    forward takes sambay's arguments plus transformers' plumbing and returns a ``CausalLMOutputWithPast`` whose
    cache field (``cache`` in current transformers 5, ``past_key_values`` in older versions) is the SambaYCache.
    The cache argument is ``cache``, as in current transformers; ``past_key_values``, the name older callers pass,
    is accepted too, without a warning."""

    config_class = Phi4FlashConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    def __init__(self, config: Phi4FlashConfig, sambay_model: SambaYForCausalLM | None = None):
        super().__init__(config)  # sets generation_config from the config's token ids (can_generate is True)
        lm = sambay_model if sambay_model is not None else SambaYForCausalLM(config.to_sambay())
        self._sambay_base = lm.config  # keys the transformers config does not carry (extra)
        self.model, self.lm_head = lm.model, lm.lm_head

    @property
    def sambay_config(self) -> SambaYConfig:
        """The transformers config as a SambaYConfig: edits to ``model.config`` (a resized vocabulary, token
        ids) are what gets saved and what new caches are built for."""
        return self.config.to_sambay(self._sambay_base)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache=None, labels: torch.Tensor | None = None, logits_to_keep: int = 0, static: bool = False,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool | None = False,
                use_cache: bool | None = None, past_key_values=None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **unset) -> CausalLMOutputWithPast:
        """sambay's forward (sambay.lm.CausalLMMixin.forward, the same arguments) with transformers' output type.
        The signature is spelled out: Trainer keeps only the dataset columns that forward names."""
        out = super().forward(input_ids, attention_mask, cache, labels, logits_to_keep, static, inputs_embeds,
                              output_hidden_states, use_cache, past_key_values, output_attentions, return_dict,
                              **unset)
        return with_cache(CausalLMOutputWithPast, out.cache, loss=out.loss, logits=out.logits,
                          hidden_states=out.hidden_states)

    def tie_weights(self, *args, **kwargs) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, torch.nn.Linear):  # quantized: a copy
            self.lm_head.weight = self.model.embed_tokens.weight

    def _set_quantization_config(self, qc) -> None:
        self.config.quantization_config = qc.to_dict()
        self.model.config = self._sambay_base = self.sambay_config

    def resize_token_embeddings(self, *args, **kwargs):
        """transformers' resize (it updates ``config.vocab_size`` and re-ties the head), then the SambaYModel's
        config follows, so the saved config.json has the new vocabulary."""
        out = super().resize_token_embeddings(*args, **kwargs)
        self.model.config = self._sambay_base = self.sambay_config
        return out

    def as_sambay(self) -> SambaYForCausalLM:
        """A SambaYForCausalLM over this model's modules (shared, not copied)."""
        with torch.device("meta"):
            lm = SambaYForCausalLM(self.sambay_config)
        lm.model, lm.lm_head = self.model, self.lm_head
        lm.generation_config = self.generation_config.to_diff_dict()
        return lm.train(self.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config: Phi4FlashConfig | None = None,
                        dtype=None, torch_dtype=None, device_map=None, quantize: str | None = None,
                        group_size: int | None = None, activations: str | None = None,
                        **kwargs) -> Phi4FlashForCausalLM:
        """sambay's strict loader (a directory, or a hub id through huggingface_hub). ``config`` (AutoModel
        passes one, with overrides such as ``resid_pdrop=0.1`` applied) must match the weights. ``quantize`` /
        ``group_size`` / ``activations``: sambay's quantization while loading (a checkpoint saved quantized by sambay
        loads quantized without them). Arguments that ask for what sambay does not do (transformers' quantizers, GGUF,
        multi-device maps) are TypeErrors unless unset."""
        bad = sorted(k for k in kwargs if k not in _IGNORED and (k not in _UNSET or kwargs[k] not in _UNSET[k]))
        if args or bad:
            shown = [repr(a) for a in args] + [f"{k}={kwargs[k]!r}" for k in bad]
            raise TypeError(f"{cls.__name__}.from_pretrained: unsupported arguments {shown}")
        dtype = dtype if dtype is not None else torch_dtype
        device = _one_device(device_map)

        def build(file_config: SambaYConfig, dtype=None) -> SambaYForCausalLM:
            return SambaYForCausalLM(file_config if config is None else config.to_sambay(file_config), dtype=dtype)

        from sambay.loading import from_pretrained, resolve_checkpoint

        directory = resolve_checkpoint(pretrained_model_name_or_path)
        lm = from_pretrained(directory, build, dtype=None if dtype == "auto" else dtype, device=device,
                             quantize=quantize, group_size=group_size, activations=activations)
        model = cls(Phi4FlashConfig.from_sambay(lm.config), sambay_model=lm).eval()
        model.config.name_or_path = model.name_or_path = os.fspath(pretrained_model_name_or_path)  # peft reads it
        saved = read_generation_config(directory)
        if saved:
            model.generation_config = GenerationConfig.from_dict(saved)
        return model

    @classmethod
    def _from_config(cls, config: Phi4FlashConfig, dtype=None, torch_dtype=None, **kwargs) -> Phi4FlashForCausalLM:
        """Random initialisation (sambay's recipe), as AutoModelForCausalLM.from_config builds it."""
        dtype = dtype if dtype is not None else torch_dtype
        return cls(config, SambaYForCausalLM(config.to_sambay(), dtype=dtype))

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
                        max_shard_size: int | str = "5GB", safe_serialization: bool = True, **kwargs) -> None:
        """The released layout written by sambay's saver, plus generation_config.json and the auto_map module
        (see sambay.lm). ``state_dict`` (Trainer passes gathered weights) is saved instead of the parameters."""
        given = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if given or not safe_serialization:
            raise TypeError(f"{type(self).__name__}.save_pretrained: unsupported arguments "
                            f"{given or ['safe_serialization=False']}")
        if not is_main_process:
            return
        self._save(save_directory, self.sambay_config, self.generation_config.to_diff_dict(), state_dict,
                   max_shard_size)


# register() hands AutoModelForCausalLM a factory so that registering stays light; now that the real class
# exists, it takes the factory's place (pipelines check the registered class's name).
if hf.registered:
    AutoModelForCausalLM.register(Phi4FlashConfig, Phi4FlashForCausalLM, exist_ok=True)
