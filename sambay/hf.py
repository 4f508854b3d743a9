"""Optional Hugging Face integration: ``AutoConfig`` / ``AutoModelForCausalLM`` for model_type ``phi4flash``.

``register()`` defines two thin wrappers and registers them with transformers, so that

    AutoModelForCausalLM.from_pretrained("path/to/Phi-4-mini-flash-reasoning")   # no trust_remote_code

builds sambay's model instead of asking to run the checkpoint's remote code (transformers prefers a
registered local class over the ``auto_map`` of config.json when trust_remote_code is not set). The
wrapper's submodules are sambay's own (``model``, ``lm_head``), so parameter names equal the checkpoint
keys; loading and saving go through :mod:`sambay.loading` (same strict loader, same layout).

Without transformers, ``register()`` does nothing. If transformers ever ships its own ``phi4flash``,
``register()`` leaves it in place (returns False) rather than replacing a library class at import time.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from sambay.cache import SambaYCache
from sambay.config import MODEL_TYPE, SambaYConfig
from sambay.model import SambaYForCausalLM, SambaYModel

# SambaYConfig's constructor fields and their defaults (the HF config carries exactly these).
_FIELDS = {f.name: f.default for f in dataclasses.fields(SambaYConfig) if f.init and f.name != "extra"}
# from_pretrained arguments that transformers (AutoModel, Trainer, hub plumbing) passes and sambay's loader
# has no use for: accepted and ignored. Anything else it cannot honour is a TypeError.
_IGNORED = {"trust_remote_code", "_from_auto", "adapter_kwargs", "revision", "cache_dir", "token", "proxies",
            "local_files_only", "force_download", "subfolder", "code_revision", "low_cpu_mem_usage",
            "use_safetensors", "attn_implementation", "_commit_hash"}

Phi4FlashConfig = None  # the classes, once register() has defined them
Phi4FlashForCausalLM = None


def register() -> bool:
    """Register sambay with transformers' Auto classes. Returns True if registered, False if transformers
    is not installed or already has a native ``phi4flash``. Safe to call more than once."""
    global Phi4FlashConfig, Phi4FlashForCausalLM
    if importlib.util.find_spec("transformers") is None:
        return False
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if MODEL_TYPE in CONFIG_MAPPING_NAMES:  # transformers' own implementation: leave it alone
        return False
    if Phi4FlashConfig is None:
        Phi4FlashConfig, Phi4FlashForCausalLM = _define_classes()
    AutoConfig.register(MODEL_TYPE, Phi4FlashConfig, exist_ok=True)
    AutoModelForCausalLM.register(Phi4FlashConfig, Phi4FlashForCausalLM, exist_ok=True)
    return True


def _define_classes():
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class Phi4FlashConfig(PretrainedConfig):
        """The HF view of :class:`SambaYConfig` (same ``config.json`` keys); ``to_sambay()`` converts."""

        model_type = MODEL_TYPE

        def __init__(self, **kwargs):
            for name, default in _FIELDS.items():
                kwargs.setdefault(name, default)
            super().__init__(**kwargs)

        def to_sambay(self, base: SambaYConfig | None = None) -> SambaYConfig:
            """This config as a SambaYConfig; keys it does not carry (auto_map, ...) come from ``base``."""
            d = base.to_dict() if base is not None else {}
            d.update({name: getattr(self, name, default) for name, default in _FIELDS.items()})
            dtype = getattr(self, "dtype", None) or d.get("torch_dtype")  # transformers 5 keeps a torch.dtype
            d["torch_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
            if getattr(self, "layer_types", None) is not None:
                d["layer_types"] = self.layer_types
            return SambaYConfig.from_dict(d)

        @classmethod
        def from_sambay(cls, config: SambaYConfig) -> Phi4FlashConfig:
            d = config.to_dict()
            d.pop("model_type")
            d.pop("auto_map", None)  # sambay is the local code; do not point back at remote code
            return cls(**d)

    class Phi4FlashForCausalLM(PreTrainedModel):
        """sambay's SambaYForCausalLM behind the PreTrainedModel interface (forward returns
        ``CausalLMOutputWithPast``). Its ``model`` and ``lm_head`` are sambay modules."""

        config_class = Phi4FlashConfig
        base_model_prefix = "model"
        main_input_name = "input_ids"
        supports_gradient_checkpointing = True
        _no_split_modules = ["Block"]

        def __init__(self, config: Phi4FlashConfig, sambay_model: SambaYForCausalLM | None = None):
            super().__init__(config)
            lm = sambay_model if sambay_model is not None else SambaYForCausalLM(config.to_sambay())
            self.sambay_config = lm.config
            self.model: SambaYModel = lm.model
            self.lm_head = lm.lm_head

        def forward(self, input_ids, attention_mask=None, cache=None, labels=None, logits_to_keep=0,
                    past_key_values=None, use_cache=None, return_dict=None):
            # SambaYForCausalLM.forward only reads self.model and self.lm_head: one code path for both.
            out = SambaYForCausalLM.forward(self, input_ids, attention_mask, cache or past_key_values, labels,
                                            logits_to_keep)
            return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=out.cache)

        def as_sambay(self) -> SambaYForCausalLM:
            """A SambaYForCausalLM over this model's own modules (no copy)."""
            with torch.device("meta"):
                lm = SambaYForCausalLM(self.sambay_config)
            lm.model, lm.lm_head = self.model, self.lm_head
            return lm.train(self.training)

        def allocate_cache(self, batch_size, max_length, dtype=None, device=None) -> SambaYCache:
            return SambaYCache(self.sambay_config, batch_size, max_length, dtype or self.dtype, device or self.device)

        def generate(self, input_ids, attention_mask=None, **kwargs):
            """sambay.generation.generate (greedy/sampling with the static cache); see its arguments."""
            return self.as_sambay().generate(input_ids, attention_mask=attention_mask, **kwargs)

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.model.gradient_checkpointing = True

        def gradient_checkpointing_disable(self):
            self.model.gradient_checkpointing = False

        def get_input_embeddings(self):
            return self.model.embed_tokens

        def get_output_embeddings(self):
            return self.lm_head

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None, torch_dtype=None,
                            device_map=None, **kwargs):
            """Load with sambay's strict loader (a directory or hub id). ``config`` (as AutoModel passes it,
            with any overrides such as dropouts) decides the architecture; it must match the weights."""
            unknown = sorted(set(kwargs) - _IGNORED)
            if args or unknown:
                raise TypeError(f"{cls.__name__}.from_pretrained: unsupported arguments {unknown or args}")
            dtype = dtype if dtype is not None else torch_dtype
            dtype = None if dtype == "auto" else dtype
            if device_map == "auto":
                device_map = "cuda" if torch.cuda.is_available() else "cpu"
            if device_map is not None and not isinstance(device_map, (str, int, torch.device)):
                raise TypeError(f"device_map: expected a device (str, int or torch.device), got {device_map!r}")

            def build(file_config: SambaYConfig, dtype=None) -> SambaYForCausalLM:
                return SambaYForCausalLM(file_config if config is None else config.to_sambay(file_config), dtype=dtype)

            from sambay.loading import from_pretrained

            lm = from_pretrained(pretrained_model_name_or_path, dtype=dtype, device=device_map, cls=build)
            return cls(Phi4FlashConfig.from_sambay(lm.config), sambay_model=lm).eval()

        def save_pretrained(self, save_directory, max_shard_size="5GB", **kwargs):
            """Write the released layout (config.json + safetensors) with sambay's saver."""
            self.as_sambay().save_pretrained(save_directory, max_shard_size=max_shard_size)

    return Phi4FlashConfig, Phi4FlashForCausalLM
