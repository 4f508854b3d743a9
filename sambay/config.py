"""SambaYConfig: the checkpoint's hyperparameters (HF ``config.json`` format, model_type ``phi4flash``)
plus the layer plan derived from them once.

Layer roles for N layers (ARCHITECTURE.md section 3), with ``mb_per_layer`` = 2 in every released model:

    i <  N/2      : "mamba" if i % mb_per_layer == 0 else "sliding_attention"   (Samba self-decoder)
    i == N/2      : "mamba"            -- the memory producer (its ungated scan output is the memory)
    i == N/2 + 1  : "full_attention"   -- the shared-KV producer (its K/V are the one shared cache)
    i >= N/2 + 2  : "gmu" if i % mb_per_layer == 0 else "cross_attention"       (cross-decoder)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

logger = logging.getLogger(__name__)

LayerType = Literal["mamba", "sliding_attention", "full_attention", "gmu", "cross_attention"]
LAYER_TYPES: tuple[str, ...] = ("mamba", "sliding_attention", "full_attention", "gmu", "cross_attention")
MODEL_TYPE = "phi4flash"


@dataclass(frozen=True)
class SambaYConfig:
    model_type: ClassVar[str] = MODEL_TYPE  # not a field: what tools written for transformers (peft) read
    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 9216
    num_hidden_layers: int = 32
    num_attention_heads: int = 40
    num_key_value_heads: int | None = 4
    sliding_window: int = 2047
    mb_per_layer: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    layer_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    use_cache: bool = field(default=True, compare=False)  # settable (see _set_use_cache): no effect on the math
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str | None = None
    # Keys of config.json that the architecture does not use (architectures, auto_map, ...), kept so
    # that save_pretrained writes them back unchanged.
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # Derived once in __post_init__ (not constructor arguments).
    head_dim: int = field(init=False)
    d_inner: int = field(init=False)
    dt_rank: int = field(init=False)
    memory_layer: int = field(init=False)
    kv_layer: int = field(init=False)
    layer_types: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        self._validate()
        n = self.num_hidden_layers
        dt_rank = math.ceil(self.hidden_size / 16) if self.mamba_dt_rank == "auto" else int(self.mamba_dt_rank)
        derived = dict(
            head_dim=self.hidden_size // self.num_attention_heads,
            d_inner=self.mamba_expand * self.hidden_size,
            dt_rank=dt_rank,
            memory_layer=n // 2,
            kv_layer=n // 2 + 1,
            layer_types=tuple(self._role(i) for i in range(n)),
        )
        for k, v in derived.items():
            object.__setattr__(self, k, v)

    def _role(self, i: int) -> str:
        n, mamba_type = self.num_hidden_layers, i % self.mb_per_layer == 0
        if i < n // 2:
            return "mamba" if mamba_type else "sliding_attention"
        if i == n // 2:
            return "mamba"
        if i == n // 2 + 1:
            return "full_attention"
        return "gmu" if mamba_type else "cross_attention"

    def _validate(self) -> None:
        def bad(name: str, value: Any, expected: str) -> ValueError:
            return ValueError(f"SambaYConfig.{name}: expected {expected}, got {value!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "mamba_d_state", "mamba_d_conv", "mamba_expand"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, v, "a positive integer")
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if h % 2:
            raise bad("num_attention_heads", h, "an even number (differential attention pairs heads)")
        if kv % 2:
            raise bad("num_key_value_heads", kv, "an even number (differential attention pairs K/V heads)")
        if h % kv:
            raise bad("num_key_value_heads", kv, f"a divisor of num_attention_heads={h}")
        if self.hidden_size % h:
            raise bad("hidden_size", self.hidden_size, f"a multiple of num_attention_heads={h}")
        if not isinstance(self.mb_per_layer, int) or self.mb_per_layer < 1:
            raise bad("mb_per_layer", self.mb_per_layer, "a positive integer (a layer is Mamba-type "
                      "iff i % mb_per_layer == 0)")
        n = self.num_hidden_layers
        if not isinstance(n, int) or n < 4 or n % 4:
            raise bad("num_hidden_layers", n, "a multiple of 4 that is >= 4 (layer N/2 must be the Mamba "
                      "memory producer and N/2+1 the full-attention K/V producer)")
        if (n // 2) % self.mb_per_layer != 0 or (n // 2 + 1) % self.mb_per_layer == 0:
            raise bad("mb_per_layer", self.mb_per_layer, f"a value making layer {n // 2} Mamba-type and "
                      f"layer {n // 2 + 1} attention-type")
        w = self.sliding_window
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise bad("sliding_window", w, "an integer >= 1 (keys seen per query, the current one included)")
        r = self.mamba_dt_rank
        if r != "auto" and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
            raise bad("mamba_dt_rank", r, "'auto' or a positive integer")
        if self.hidden_act != "silu":
            raise bad("hidden_act", self.hidden_act, "'silu' (the SwiGLU MLP is the only one SambaY uses)")

    # ---- derived views -------------------------------------------------------------------------
    @property
    def num_diff_heads(self) -> int:
        """Differential heads: each pairs query heads 2j and 2j+1."""
        return self.num_attention_heads // 2

    @property
    def num_kv_pairs(self) -> int:
        return self.num_key_value_heads // 2

    @property
    def first_cross_layer(self) -> int:
        return self.num_hidden_layers // 2 + 2

    def lambda_init(self, layer: int) -> float:
        """Differential-attention lambda_init for the 0-based global layer index."""
        return 0.8 - 0.6 * math.exp(-0.3 * layer)

    # ---- HF config.json I/O ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> SambaYConfig:
        d = dict(d)
        mt = d.pop("model_type", MODEL_TYPE)
        if mt != MODEL_TYPE:
            raise ValueError(f"SambaYConfig.model_type: expected {MODEL_TYPE!r}, got {mt!r}")
        n = d.get("num_hidden_layers", cls.num_hidden_layers)
        d["sliding_window"] = _window_from_config(d.get("sliding_window", cls.sliding_window), n)
        layer_types = d.pop("layer_types", None)
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in names}
        extra.update(d.pop("extra", {}) or {})
        if extra:
            logger.debug("SambaYConfig: keeping keys the architecture does not use: %s", sorted(extra))
        cfg = cls(**d, extra=extra)
        if layer_types is not None:
            _check_layer_types(cfg, layer_types)
            cfg.extra["layer_types"] = list(layer_types)
        return cfg

    def to_dict(self) -> dict:
        out = {"model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.init and f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        return dict(sorted(out.items()))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SambaYConfig:
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SambaYConfig:
        """Read a checkpoint directory's ``config.json`` or a config file path."""
        path = os.fspath(path)
        if os.path.isdir(path):
            cfg_path = os.path.join(path, "config.json")
            if not os.path.isfile(cfg_path):
                raise FileNotFoundError(f"{path} is a directory without config.json")
            return cls.from_json(cfg_path)
        if os.path.isfile(path):
            return cls.from_json(path)
        raise FileNotFoundError(f"no such checkpoint directory or config file: {path}")


def _set_use_cache(self, name: str, value: Any) -> None:
    """SambaYConfig is frozen except ``use_cache``, which tools set on any model's config (transformers' Trainer
    writes ``model.config.use_cache``) and which changes no computation."""
    if name != "use_cache":
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r} (SambaYConfig is frozen; use "
                                              f"dataclasses.replace)")
    if not isinstance(value, bool):
        raise TypeError(f"SambaYConfig.use_cache: expected a bool, got {value!r}")
    object.__setattr__(self, name, value)


SambaYConfig.__setattr__ = _set_use_cache


def _window_from_config(value: Any, num_layers: int) -> Any:
    """Accept the int form and the older per-layer list form (w on sliding layers, None elsewhere)."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) != num_layers:
        raise ValueError(f"SambaYConfig.sliding_window: expected an int or a list of {num_layers} entries, "
                         f"got a list of {len(value)}")
    ws = {w for w in value if w is not None}
    if len(ws) != 1:
        raise ValueError(f"SambaYConfig.sliding_window: expected one window size in the per-layer list, "
                         f"got {sorted(ws, key=str) or 'none'}")
    return ws.pop()


def _check_layer_types(cfg: SambaYConfig, layer_types: Any) -> None:
    """A config may carry ``layer_types``: ours (5 roles) or HF's ("sliding_attention"/"full_attention"
    for attention layers). Either way it must agree with the plan derived from the layout rule."""
    lt = list(layer_types)
    if len(lt) != cfg.num_hidden_layers:
        raise ValueError(f"SambaYConfig.layer_types: expected {cfg.num_hidden_layers} entries, got {len(lt)}")
    for i, (given, derived) in enumerate(zip(lt, cfg.layer_types)):
        # HF's list only separates sliding from non-sliding layers; it may call Mamba/GMU layers "mamba".
        hf_alias = {"full_attention": ("full_attention", "cross_attention", "mamba", "gmu"),
                    "mamba": ("mamba", "gmu"), "sliding_attention": ("sliding_attention",)}
        ok = given == derived or derived in hf_alias.get(given, ())
        if not ok:
            raise ValueError(f"SambaYConfig.layer_types[{i}]: expected {derived!r} (derived from the SambaY "
                             f"layout), got {given!r}")
