"""Optional Hugging Face integration: ``AutoConfig`` / ``AutoModelForCausalLM`` for model_type ``phi4flash``.

After ``register()`` (which ``import sambay`` calls),

    AutoModelForCausalLM.from_pretrained("path/to/Phi-4-mini-flash-reasoning")   # no trust_remote_code

builds sambay's model instead of the checkpoint's remote code: transformers uses a registered local class
and ignores the ``auto_map`` of config.json unless trust_remote_code=True is passed (transformers >= 5 uses
the registered class even then). The model's submodules are sambay's own (``model``, ``lm_head``), so
parameter names equal the checkpoint keys, and loading and saving go through :mod:`sambay.loading` (the
same strict loader, the released layout).

``PreTrainedModel`` pulls in torch._dynamo (and with it triton), seconds of import time, so the model class
is defined, and registered for AutoModelForCausalLM, when the first ``Phi4FlashConfig`` is created: every
Auto path builds the config before it looks for the model class. ``register()`` itself only registers the
config, which imports the light part of transformers.

Without transformers, ``register()`` does nothing and returns False. If transformers ever ships its own
``phi4flash``, ``register()`` leaves it in place rather than replace a library class.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from sambay.cache import SambaYCache
from sambay.config import MODEL_TYPE, SambaYConfig
from sambay.model import SambaYForCausalLM

try:
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
except ImportError:  # transformers is optional: nothing to register
    PretrainedConfig = None

__all__ = ["Phi4FlashConfig", "Phi4FlashForCausalLM", "register"]  # noqa: F822 (the model class is lazy)

# SambaYConfig's constructor fields and defaults: the transformers config carries exactly these keys.
_FIELDS = {f.name: f.default for f in dataclasses.fields(SambaYConfig)
           if f.init and f.name not in ("extra", "torch_dtype")}
# from_pretrained arguments that transformers (AutoModel, hub plumbing) passes and sambay's loader does not
# need: accepted and ignored. Anything else it cannot honour is a TypeError.
_IGNORED = {"trust_remote_code", "_from_auto", "adapter_kwargs", "revision", "cache_dir", "token", "proxies",
            "local_files_only", "force_download", "subfolder", "code_revision", "low_cpu_mem_usage",
            "use_safetensors", "attn_implementation", "_commit_hash"}


def register() -> bool:
    """Register sambay with transformers' Auto classes (idempotent). Returns False when transformers is not
    installed or has a native ``phi4flash`` of its own, True otherwise."""
    if PretrainedConfig is None or MODEL_TYPE in CONFIG_MAPPING_NAMES:
        return False
    AutoConfig.register(MODEL_TYPE, Phi4FlashConfig, exist_ok=True)
    return True


def __getattr__(name: str):
    if name == "Phi4FlashForCausalLM":  # built on first use (see the module docstring); None without transformers
        return None if PretrainedConfig is None else _model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if PretrainedConfig is not None:

    class Phi4FlashConfig(PretrainedConfig):
        """The transformers view of :class:`SambaYConfig` (the same config.json keys)."""

        model_type = MODEL_TYPE

        def __init__(self, **kwargs):
            for name, default in _FIELDS.items():
                kwargs.setdefault(name, default)
            super().__init__(**kwargs)
            AutoModelForCausalLM.register(Phi4FlashConfig, _model_class(), exist_ok=True)

        def to_sambay(self, base: SambaYConfig | None = None) -> SambaYConfig:
            """This config as a SambaYConfig; keys it does not carry (auto_map, ...) are taken from ``base``."""
            d = base.to_dict() if base is not None else {}
            d.update({name: getattr(self, name) for name in _FIELDS if hasattr(self, name)})
            dtype = vars(self).get("dtype") or vars(self).get("torch_dtype")  # transformers 5 / 4 (no warning)
            d["torch_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
            return SambaYConfig.from_dict(d)

        @classmethod
        def from_sambay(cls, config: SambaYConfig) -> Phi4FlashConfig:
            d = config.to_dict()
            del d["model_type"]
            d.pop("auto_map", None)  # sambay is the code; do not point back at remote code
            return cls(**d)

else:
    Phi4FlashConfig = None


@functools.cache
def _model_class():
    from transformers import GenerationConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class Phi4FlashForCausalLM(PreTrainedModel):
        """sambay's SambaYForCausalLM behind the PreTrainedModel interface. ``model`` and ``lm_head`` are
        sambay modules; forward has sambay's signature and returns a transformers ``CausalLMOutput``."""

        config_class = Phi4FlashConfig
        base_model_prefix = "model"
        supports_gradient_checkpointing = True
        accepts_loss_kwargs = False  # Trainer: the loss is the mean over the batch's real tokens

        def __init__(self, config: Phi4FlashConfig, sambay_model: SambaYForCausalLM | None = None):
            super().__init__(config)
            lm = sambay_model if sambay_model is not None else SambaYForCausalLM(config.to_sambay())
            self.sambay_config = lm.config
            self.model, self.lm_head = lm.model, lm.lm_head
            if getattr(self, "generation_config", None) is None:  # peft reads it
                self.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                                          eos_token_id=config.eos_token_id,
                                                          pad_token_id=config.pad_token_id)

        def forward(self, input_ids, attention_mask=None, cache=None, labels=None, logits_to_keep=0, **unset):
            """sambay's forward. ``unset``: the transformers plumbing that wrappers such as peft's
            PeftModelForCausalLM always pass (inputs_embeds, output_attentions, ...), accepted only when unset."""
            given = sorted(k for k, v in unset.items()
                           if v is not None and v is not False and k not in ("return_dict", "use_cache"))
            if given:
                raise TypeError(f"{type(self).__name__}.forward does not support {given}")
            # SambaYForCausalLM.forward reads only self.model and self.lm_head: one code path for both.
            out = SambaYForCausalLM.forward(self, input_ids, attention_mask, cache, labels, logits_to_keep)
            return CausalLMOutput(loss=out.loss, logits=out.logits)

        @classmethod
        def can_generate(cls) -> bool:
            return False  # transformers' generation machinery is not used: generate() below is sambay's

        def prepare_inputs_for_generation(self, input_ids, **kwargs):  # peft looks it up
            return {"input_ids": input_ids, **kwargs}

        def as_sambay(self) -> SambaYForCausalLM:
            """A SambaYForCausalLM over this model's modules (shared, not copied)."""
            with torch.device("meta"):
                lm = SambaYForCausalLM(self.sambay_config)
            lm.model, lm.lm_head = self.model, self.lm_head
            return lm.train(self.training)

        def allocate_cache(self, batch_size, max_length, dtype=None, device=None) -> SambaYCache:
            return SambaYCache(self.sambay_config, batch_size, max_length, dtype or self.dtype, device or self.device)

        def generate(self, input_ids, attention_mask=None, **kwargs):
            """sambay.generation.generate (static cache; greedy, or sampling with do_sample=True)."""
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
            """sambay's strict loader (a directory, or a hub id through huggingface_hub). ``config`` (AutoModel
            passes one, with overrides such as ``resid_pdrop=0.1`` applied) must match the weights."""
            unknown = sorted(set(kwargs) - _IGNORED)
            if args or unknown:
                raise TypeError(f"{cls.__name__}.from_pretrained: unsupported arguments {list(args) + unknown}")
            dtype = dtype if dtype is not None else torch_dtype
            if device_map == "auto":
                device_map = "cuda" if torch.cuda.is_available() else "cpu"
            if device_map is not None and not isinstance(device_map, (str, int, torch.device)):
                raise TypeError(f"device_map: expected one device (str, int or torch.device), got {device_map!r}")

            def build(file_config: SambaYConfig, dtype=None) -> SambaYForCausalLM:
                return SambaYForCausalLM(file_config if config is None else config.to_sambay(file_config), dtype=dtype)

            from sambay.loading import from_pretrained

            lm = from_pretrained(pretrained_model_name_or_path, dtype=None if dtype == "auto" else dtype,
                                 device=device_map, cls=build)
            return cls(Phi4FlashConfig.from_sambay(lm.config), sambay_model=lm).eval()

        @classmethod
        def _from_config(cls, config: Phi4FlashConfig, dtype=None, torch_dtype=None, **kwargs):
            """Random initialisation (sambay's recipe), as AutoModelForCausalLM.from_config builds it."""
            dtype = dtype if dtype is not None else torch_dtype
            return cls(config, SambaYForCausalLM(config.to_sambay(), dtype=dtype))

        def save_pretrained(self, save_directory, max_shard_size="5GB", state_dict=None, is_main_process=True,
                            safe_serialization=True, **kwargs):
            """The released layout (config.json + safetensors), written by sambay's saver. ``state_dict``
            (Trainer passes gathered weights) is saved instead of this model's own parameters."""
            if any(v is not None and v is not False for v in kwargs.values()):
                raise TypeError(f"{type(self).__name__}.save_pretrained: unsupported arguments {sorted(kwargs)}")
            if not is_main_process:
                return
            lm = self.as_sambay()
            if state_dict is not None:
                with torch.device("meta"):
                    lm = SambaYForCausalLM(self.sambay_config)
                lm.load_state_dict(state_dict, strict=True, assign=True)
                lm.tie_weights()
            lm.save_pretrained(save_directory, max_shard_size=max_shard_size)

    Phi4FlashForCausalLM.__qualname__ = "Phi4FlashForCausalLM"  # picklable as sambay.hf.Phi4FlashForCausalLM
    return Phi4FlashForCausalLM
