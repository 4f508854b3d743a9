"""The two subjects of every comparison, with random weights at the same shape, behind one interface:
a random decode state at a given context, one decode step, one prefill.

sambay: ``SambaYForCausalLM``. The baseline: ``transformers.Phi3ForCausalLM`` (Phi-4-mini's architecture, a
plain GQA transformer) with the same hidden size, layers, heads, KV heads, intermediate size and vocabulary,
tied embeddings, SDPA attention. transformers is imported only when the baseline is built.

Decode states are random values at length N instead of a prefill of N tokens: the cost of a step does not
depend on the values (neither model has data-dependent control flow), and it keeps 16K-32K contexts
affordable on a CPU. Each step feeds back the greedy token, as generation does. The baseline decodes from a
``StaticCache`` sized to the measurement (it attends over its whole capacity under a mask, so a much larger
cache would penalise it; it was faster per step than the DynamicCache, which copies its K/V every step).
"""

from __future__ import annotations

import inspect
import json
from importlib import resources
from pathlib import Path

import torch

from sambay import SambaYConfig, SambaYForCausalLM

CONFIGS = ("phi4-mini-flash-reasoning", "sambay-scaled-cpu")  # shipped in the wheel: sambay/bench/configs/


def load_config(name_or_path: str | Path) -> dict:
    """An HF config.json dict: a shipped config by name (see ``CONFIGS``), or a path to a config.json file
    or a checkpoint directory holding one."""
    if str(name_or_path) in CONFIGS:
        return json.loads((resources.files("sambay.bench") / "configs" / f"{name_or_path}.json").read_text())
    path = Path(name_or_path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"config: expected one of {CONFIGS} or a config.json path, got {name_or_path}")
    return json.loads(path.read_text())


class SambaY:
    name = "sambay"

    def __init__(self, config: dict, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
        torch.manual_seed(seed)
        self._wrap(SambaYForCausalLM(SambaYConfig.from_dict(config), device=device, dtype=dtype))

    @classmethod
    def from_model(cls, model: SambaYForCausalLM) -> SambaY:
        """Wrap an already built or loaded model (e.g. ``from_pretrained``) instead of building a random one."""
        self = cls.__new__(cls)
        self._wrap(model)
        return self

    def _wrap(self, model: SambaYForCausalLM) -> None:
        self.model = model.eval()
        self.device = model.device

    def random_decode_state(self, batch: int, context: int, room: int) -> dict:
        """A cache whose first ``context`` positions hold random state, with ``room`` more positions."""
        cache = self.model.allocate_cache(batch, context + room)
        g = torch.Generator(device=self.device).manual_seed(context)
        for layer in cache.layers:
            for t in vars(layer).values() if layer is not None else ():
                t.normal_(generator=g)
        cache.seek(context)
        token = torch.randint(0, self.model.config.vocab_size, (batch,), device=self.device, generator=g)
        return {"cache": cache, "token": token, "pos": context}

    def decode_step(self, state: dict) -> None:
        logits = self.model(state["token"][:, None], cache=state["cache"], logits_to_keep=1).logits
        state["token"] = logits[:, -1].argmax(-1)
        state["pos"] += 1

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """A fresh prefill of ids (B, T) into a new cache; last-position logits (B, 1, V)."""
        return self.model(ids, cache=self.model.allocate_cache(ids.shape[0], ids.shape[1]), logits_to_keep=1).logits

    def prefill_chunk(self, state: dict, ids: torch.Tensor) -> torch.Tensor:
        """Prefill ids (B, T) after the state's context (a chunk of a longer prompt); last-position logits."""
        logits = self.model(ids, cache=state["cache"], logits_to_keep=1).logits
        state["pos"] += ids.shape[1]
        return logits


def phi3_config(config: dict):
    """The same-shape ``transformers.Phi3Config`` of a sambay config dict."""
    import transformers

    c = SambaYConfig.from_dict(config)
    pc = transformers.Phi3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    pc._attn_implementation = "sdpa"
    return pc


class Phi3:
    name = "phi3"

    def __init__(self, config: dict, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
        try:
            import transformers
        except ImportError:
            raise ImportError("the baseline is transformers.Phi3ForCausalLM: pip install 'sambay[bench]'") from None
        pc = phi3_config(config)
        torch.manual_seed(seed)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = transformers.Phi3ForCausalLM(pc)
        finally:
            torch.set_default_dtype(old)
        self._wrap(model.to(device=device, dtype=dtype))

    @classmethod
    def from_model(cls, model) -> Phi3:
        """Wrap an already built ``transformers.Phi3ForCausalLM`` (any shape; its config and dtype are used)."""
        self = cls.__new__(cls)
        self._wrap(model)
        return self

    def _wrap(self, model) -> None:
        import transformers

        self.tf = transformers
        self.model = model.eval()
        self.config = model.config
        self.device, self.dtype = model.device, model.dtype
        params = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.pass_cache_position = "cache_position" in params  # transformers 4.x needs it

    def _forward(self, ids: torch.Tensor, cache, pos0: int) -> torch.Tensor:
        B, T = ids.shape
        positions = torch.arange(pos0, pos0 + T, device=self.device)
        kw = {self.cache_kw: cache, "use_cache": True, "logits_to_keep": 1, "position_ids": positions.expand(B, -1)}
        if self.pass_cache_position:
            kw["cache_position"] = positions
        return self.model(input_ids=ids, **kw).logits

    def random_decode_state(self, batch: int, context: int, room: int) -> dict:
        c = self.config
        cache = self.tf.StaticCache(config=c, max_cache_len=context + room)
        g = torch.Generator(device=self.device).manual_seed(context)
        shape = (batch, c.num_key_value_heads, context, c.hidden_size // c.num_attention_heads)
        pos = torch.arange(context, device=self.device)
        for i in range(c.num_hidden_layers):
            k, v = (torch.randn(shape, device=self.device, dtype=self.dtype, generator=g) for _ in range(2))
            cache.update(k, v, i, {"cache_position": pos})
        token = torch.randint(0, c.vocab_size, (batch,), device=self.device, generator=g)
        return {"cache": cache, "token": token, "pos": context}

    def decode_step(self, state: dict) -> None:
        logits = self._forward(state["token"][:, None], state["cache"], state["pos"])
        state["token"] = logits[:, -1].argmax(-1)
        state["pos"] += 1

    def prefill_chunk(self, state: dict, ids: torch.Tensor) -> torch.Tensor:
        logits = self._forward(ids, state["cache"], state["pos"])
        state["pos"] += ids.shape[1]
        return logits

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        try:
            cache = self.tf.DynamicCache(config=self.config)
        except TypeError:  # transformers 4.x: no config argument
            cache = self.tf.DynamicCache()
        return self._forward(ids, cache, 0)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def shape(config: dict) -> str:
    c = SambaYConfig.from_dict(config)
    return (f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads}/{c.num_key_value_heads} "
            f"heads (head dim {c.head_dim}), intermediate {c.intermediate_size}, vocab {c.vocab_size}, "
            f"window {c.sliding_window}")
