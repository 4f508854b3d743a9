"""Hugging Face integration, the light part: the transformers config class and the Auto-class registration.

Two ways for transformers to build sambay's model:

- ``register()`` (explicit; ``import sambay`` does not call it): ``AutoConfig`` / ``AutoModelForCausalLM`` for
  model_type ``phi4flash``, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads any phi4flash checkpoint
  (the released one included) with sambay and without ``trust_remote_code``: transformers prefers a registered
  local class to the ``auto_map`` of config.json.
- checkpoints saved by sambay name ``modeling_sambay.py`` (written next to them, see :mod:`sambay.lm`) in their
  ``auto_map``: ``from_pretrained(dir, trust_remote_code=True)`` works in a process that never imported sambay.

Importing this module and registering import only transformers' configuration code. The model class
(:mod:`sambay.hf_model`, a ``PreTrainedModel``) pulls in torch._dynamo and triton, seconds of import time, so
the registration hands ``AutoModelForCausalLM`` a small factory whose ``from_pretrained`` / ``_from_config``
import it when a model is built; ``sambay.hf.Phi4FlashForCausalLM`` imports it on first access.

Without transformers, ``register()`` does nothing and returns False and both class names are None. If
transformers ever ships its own ``phi4flash``, ``register()`` leaves it in place rather than replace it.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from sambay.config import MODEL_TYPE, SambaYConfig

__all__ = ["Phi4FlashConfig", "Phi4FlashForCausalLM", "register"]  # noqa: F822 (Phi4FlashForCausalLM: lazy)

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
registered = False  # set by register()
# SambaYConfig's constructor fields and defaults: the transformers config carries exactly these keys (and
# quantization_config only when the weights are quantized: transformers reads its presence as "quantized").
_FIELDS = {f.name: f.default for f in dataclasses.fields(SambaYConfig)
           if f.init and f.name not in ("extra", "torch_dtype", "quantization_config")}


def __getattr__(name: str):
    if name == "Phi4FlashForCausalLM":  # the heavy module, imported on first use (None without transformers)
        if not HAS_TRANSFORMERS:
            return None
        from sambay.hf_model import Phi4FlashForCausalLM

        return Phi4FlashForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> bool:
    """Register sambay with transformers' Auto classes (idempotent, cheap). Returns False when transformers is
    not installed or has a native ``phi4flash`` of its own, True otherwise."""
    global registered
    if not HAS_TRANSFORMERS:
        return False
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if MODEL_TYPE in CONFIG_MAPPING_NAMES:
        return False
    AutoConfig.register(MODEL_TYPE, Phi4FlashConfig, exist_ok=True)
    import sys

    model = sys.modules.get("sambay.hf_model")  # the real class once it exists, else the light factory
    AutoModelForCausalLM.register(Phi4FlashConfig, model.Phi4FlashForCausalLM if model else _Phi4FlashFactory,
                                  exist_ok=True)
    registered = True
    return True


if HAS_TRANSFORMERS:
    from transformers import PretrainedConfig

    class Phi4FlashConfig(PretrainedConfig):
        """The transformers view of :class:`SambaYConfig` (the same config.json keys)."""

        model_type = MODEL_TYPE

        def __init__(self, **kwargs):
            for name, default in _FIELDS.items():
                kwargs.setdefault(name, default)
            super().__init__(**kwargs)

        def to_sambay(self, base: SambaYConfig | None = None) -> SambaYConfig:
            """This config as a SambaYConfig; keys it does not carry (auto_map, ...) are taken from ``base``."""
            d = base.to_dict() if base is not None else {}
            d.update({name: getattr(self, name) for name in _FIELDS if hasattr(self, name)})
            dtype = vars(self).get("dtype") or vars(self).get("torch_dtype")  # transformers 5 / 4 (no warning)
            d["torch_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
            if vars(self).get("quantization_config") is not None:
                d["quantization_config"] = self.quantization_config
            return SambaYConfig.from_dict(d)

        @classmethod
        def from_sambay(cls, config: SambaYConfig) -> Phi4FlashConfig:
            d = config.to_dict()
            del d["model_type"]
            d.pop("auto_map", None)  # sambay is the code; the saver writes its own auto_map
            d.pop("transformers_version", None)
            return cls(**d)

    class _Phi4FlashFactory:
        """What register() maps Phi4FlashConfig to for AutoModelForCausalLM: builds the real model class
        (sambay.hf_model.Phi4FlashForCausalLM) only when a model is asked for."""

        config_class = Phi4FlashConfig

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            from sambay.hf_model import Phi4FlashForCausalLM

            return Phi4FlashForCausalLM.from_pretrained(*args, **kwargs)

        @classmethod
        def _from_config(cls, *args, **kwargs):
            from sambay.hf_model import Phi4FlashForCausalLM

            return Phi4FlashForCausalLM._from_config(*args, **kwargs)

else:
    Phi4FlashConfig = None
