"""sambay's vLLM plugin: ``Phi4FlashForCausalLM`` (SambaY) on vLLM's V1 engine.

Only vLLM imports this package, through the ``vllm.general_plugins`` entry point that ``pip install
"sambay[vllm]"`` declares; ``import sambay`` never imports vLLM. :func:`register` runs in every vLLM process
(the front end, the engine core, the workers) before a model is resolved. It

- registers the architecture ``Phi4FlashForCausalLM`` lazily (``sambay.vllm.model``, imported when a model is
  built), which replaces the "supported until v0.10.2" answer of vLLM's registry;
- gives vLLM the config class (:class:`sambay.vllm.config.Phi4FlashVllmConfig`) for ``model_type`` phi4flash,
  so checkpoints whose ``config.json`` names remote code in ``auto_map`` (the released one) load without
  ``--trust-remote-code``;
- adds the per-architecture config hook that turns prefix caching off (see :mod:`sambay.vllm.config`).

The model itself is in :mod:`sambay.vllm.model`; what of vLLM's internals it relies on is listed there.
"""

from __future__ import annotations

ARCHITECTURE = "Phi4FlashForCausalLM"


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent)."""
    from vllm import ModelRegistry

    from sambay.vllm.config import register_config

    register_config()
    ModelRegistry.register_model(ARCHITECTURE, "sambay.vllm.model:Phi4FlashForCausalLM")
