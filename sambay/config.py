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
import difflib
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

logger = logging.getLogger(__name__)

LayerType = Literal["mamba", "sliding_attention", "full_attention", "gmu", "cross_attention"]
LAYER_TYPES: tuple[str, ...] = ("mamba", "sliding_attention", "full_attention", "gmu", "cross_attention")
MODEL_TYPE = "phi4flash"


DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
# Keys that transformers' PretrainedConfig (4.x and 5.x) writes into a config.json, and generation keys that
# older versions wrote there. They mean nothing to the architecture: kept in ``extra`` without a warning.
HF_KEYS: frozenset[str] = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "add_cross_attention",
    "architectures", "auto_map", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
    "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "keys_to_ignore_at_inference",
    "label2id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups",
    "num_beams", "num_labels", "num_return_sequences", "output_attentions", "output_hidden_states",
    "output_scores", "prefix", "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty",
    "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params",
    "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "torchscript",
    "transformers_version", "typical_p", "use_bfloat16",
})
# Keys that would change the architecture if set: accepted only with the value SambaY hard-codes
# (ARCHITECTURE.md section 2), refused otherwise rather than silently ignored.
FIXED_KEYS: dict[str, Any] = {"mlp_bias": False, "lm_head_bias": False, "rope_scaling": None}
# Derived sizes (never written by to_dict): a config that states one must agree with the derivation.
DERIVED = ("head_dim", "d_inner", "dt_rank", "memory_layer", "kv_layer")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad(name: str, value: Any, expected: str, kind: type[Exception] = ValueError) -> Exception:
    got = f"{value!r}" if kind is ValueError else f"{value!r} ({type(value).__name__})"
    return kind(f"SambaYConfig.{name}: expected {expected}, got {got}")


def _positive_int(name: str, v: Any) -> None:
    if not _is_int(v):
        raise _bad(name, v, "a positive integer", TypeError)
    if v < 1:
        raise _bad(name, v, "a positive integer")


def _float_in(name: str, v: Any, lo: float, hi: float, expected: str) -> None:
    """lo <= v < hi (hi = inf: any finite v >= lo); JSON ints count as numbers."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise _bad(name, v, expected, TypeError)
    if not (math.isfinite(v) and lo <= v < hi):
        raise _bad(name, v, expected)


def _positive_float(name: str, v: Any) -> None:
    _float_in(name, v, 0.0, math.inf, "a finite number > 0")
    if v == 0:
        raise _bad(name, v, "a finite number > 0")


def _token_id(name: str, v: Any, vocab_size: int, allow_none: bool = True) -> None:
    expected = f"a token id in [0, vocab_size={vocab_size})" + (" or null" if allow_none else "")
    if v is None and allow_none:
        return
    if not _is_int(v):
        raise _bad(name, v, expected, TypeError)
    if not 0 <= v < vocab_size:
        raise _bad(name, v, expected)


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
    # Weight-only quantization (sambay.quant.QuantizationConfig; config.json holds its dict), or None. How weights
    # are stored, not the architecture: configs that differ only here compare equal (a cache fits both).
    quantization_config: Any = field(default=None, compare=False)
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
        object.__setattr__(self, "torch_dtype", _dtype_name(self.torch_dtype))  # "torch.bfloat16" -> "bfloat16"
        object.__setattr__(self, "quantization_config", _quantization(self.quantization_config))
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
        """Every field's domain, and the divisibility the layer plan and the attention heads need."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "mamba_d_state", "mamba_d_conv", "mamba_expand", "max_position_embeddings", "mb_per_layer"):
            _positive_int(name, getattr(self, name))
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if h % 2:
            raise _bad("num_attention_heads", h, "an even number (differential attention pairs heads)")
        if kv % 2:
            raise _bad("num_key_value_heads", kv, "an even number (differential attention pairs K/V heads)")
        if h % kv:
            raise _bad("num_key_value_heads", kv, f"a divisor of num_attention_heads={h}")
        if self.hidden_size % h:
            raise _bad("hidden_size", self.hidden_size, f"a multiple of num_attention_heads={h}")
        n = self.num_hidden_layers
        if not _is_int(n):
            raise _bad("num_hidden_layers", n, "a multiple of 4 that is >= 4", TypeError)
        if n < 4 or n % 4:
            raise _bad("num_hidden_layers", n, "a multiple of 4 that is >= 4 (layer N/2 must be the Mamba "
                       "memory producer and N/2+1 the full-attention K/V producer)")
        if (n // 2) % self.mb_per_layer != 0 or (n // 2 + 1) % self.mb_per_layer == 0:
            raise _bad("mb_per_layer", self.mb_per_layer, f"a value making layer {n // 2} Mamba-type and "
                       f"layer {n // 2 + 1} attention-type (a layer is Mamba-type iff i % mb_per_layer == 0)")
        w, expected = self.sliding_window, "an integer >= 1 (keys seen per query, the current one included)"
        if not _is_int(w):
            raise _bad("sliding_window", w, expected, TypeError)
        if w < 1:
            raise _bad("sliding_window", w, expected)
        r = self.mamba_dt_rank
        if r != "auto":
            if not _is_int(r):
                raise _bad("mamba_dt_rank", r, "'auto' or a positive integer", TypeError)
            if r < 1:
                raise _bad("mamba_dt_rank", r, "'auto' or a positive integer")
        if self.hidden_act != "silu":
            raise _bad("hidden_act", self.hidden_act, "'silu' (the SwiGLU MLP is the only one SambaY uses)")
        _positive_float("layer_norm_eps", self.layer_norm_eps)
        _positive_float("rope_theta", self.rope_theta)  # unused (NoPE), but a checkpoint with 0 or NaN is broken
        _float_in("initializer_range", self.initializer_range, 0.0, math.inf, "a finite number >= 0")
        for name in ("resid_pdrop", "embd_pdrop", "attention_dropout"):
            _float_in(name, getattr(self, name), 0.0, 1.0, "a probability in [0, 1)")
        for name in ("mamba_conv_bias", "mamba_proj_bias", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "true or false", TypeError)
        for name in ("pad_token_id", "bos_token_id"):
            _token_id(name, getattr(self, name), self.vocab_size)
        eos = self.eos_token_id
        if isinstance(eos, (list, tuple)):
            if not eos:
                raise _bad("eos_token_id", eos, "an id, a non-empty list of ids, or null")
            for i, e in enumerate(eos):
                _token_id(f"eos_token_id[{i}]", e, self.vocab_size, allow_none=False)
        else:
            _token_id("eos_token_id", eos, self.vocab_size)
        if self.torch_dtype is not None and self.torch_dtype not in DTYPE_NAMES:
            raise _bad("torch_dtype", self.torch_dtype, f"one of {', '.join(DTYPE_NAMES)} or null",
                       TypeError if not isinstance(self.torch_dtype, str) else ValueError)
        if not isinstance(self.extra, dict):
            raise _bad("extra", self.extra, "a dict of the config.json keys the architecture does not use", TypeError)

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
        """Build from a ``config.json`` dict. Keys the architecture does not use are kept in ``extra`` (and
        written back by ``to_dict``); a key that is neither a field nor a known transformers key gives a
        warning naming the fields it is close to (a typo such as ``sliding_windw`` would otherwise be dropped)."""
        return cls._from_dict(d, "SambaYConfig.from_dict")

    @classmethod
    def _from_dict(cls, d: Any, source: str) -> SambaYConfig:
        if not isinstance(d, Mapping):
            raise TypeError(f"{source}: expected a dict of config.json keys, got {type(d).__name__}")
        d = dict(d)
        mt = d.pop("model_type", MODEL_TYPE)
        if mt != MODEL_TYPE:
            raise ValueError(f"SambaYConfig.model_type: expected {MODEL_TYPE!r}, got {mt!r}")
        if "dtype" in d:  # transformers >= 4.56 writes "dtype" where older versions wrote "torch_dtype"
            alias, given = d.pop("dtype"), d.get("torch_dtype")
            if given is not None and alias is not None and _dtype_name(given) != _dtype_name(alias):
                raise ValueError(f"{source}: dtype={alias!r} and torch_dtype={d['torch_dtype']!r} disagree; expected "
                                 f"one of them, or the same value in both")
            if d.get("torch_dtype") is None:
                d["torch_dtype"] = alias
        for key, fixed in FIXED_KEYS.items():
            if key in d and d[key] != fixed and not (fixed is None and d[key] == {}):
                raise ValueError(f"SambaYConfig.{key}: expected {fixed!r} (SambaY has no such variant), got {d[key]!r}")
        n = d.get("num_hidden_layers", cls.num_hidden_layers)
        d["sliding_window"] = _window_from_config(d.get("sliding_window", cls.sliding_window), n)
        layer_types = d.pop("layer_types", None)
        stated = {k: d.pop(k) for k in DERIVED if k in d}
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in names and k != "extra"}
        if "extra" in d:
            if not isinstance(d["extra"], Mapping):
                raise _bad("extra", d["extra"], "a dict", TypeError)
            extra.update(d.pop("extra"))
        unknown = sorted(k for k in extra if k not in HF_KEYS and k not in FIXED_KEYS)
        if unknown:
            warnings.warn(f"{source}: unknown config key(s) {', '.join(_with_suggestions(unknown, names))}; they do "
                          f"not affect the model (kept and written back on save)", UserWarning, stacklevel=3)
        cfg = cls(**d, extra=extra)
        for k, v in stated.items():
            if v != getattr(cfg, k):
                raise ValueError(f"SambaYConfig.{k}: the config states {v!r}, but the other fields give "
                                 f"{getattr(cfg, k)!r} (it is derived, not a free parameter)")
        if layer_types is not None:
            _check_layer_types(cfg, layer_types)
            cfg.extra["layer_types"] = list(layer_types)
        return cfg

    def to_dict(self) -> dict:
        out = {"model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.init and f.name not in ("extra", "quantization_config"):
                out[f.name] = getattr(self, f.name)
        if self.quantization_config is not None:  # written only when set, as transformers does
            out["quantization_config"] = self.quantization_config.to_dict()
        out.update(self.extra)
        return dict(sorted(out.items()))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SambaYConfig:
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not a UTF-8 text file ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of config keys, found a JSON {_json_kind(d)}")
        return cls._from_dict(d, os.fspath(path))

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


def _quantization(value: Any):
    """config.json's quantization_config (a dict; {} and null mean none) -> sambay.quant.QuantizationConfig or None.
    Only sambay's own format is accepted: any other (bitsandbytes, gptq, a newer format_version) is a ValueError
    naming what was found and what this code reads."""
    if value is None or value == {}:
        return None
    from sambay.quant import QuantizationConfig  # imports torch: only for quantized configs

    if isinstance(value, QuantizationConfig):
        return value
    try:
        return QuantizationConfig.from_dict(value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"SambaYConfig.{e}") from None


def _window_from_config(value: Any, num_layers: int) -> Any:
    """Accept the int form and the older per-layer list form (w on sliding layers, None elsewhere)."""
    if not isinstance(value, (list, tuple)):
        return value
    for i, w in enumerate(value):
        if w is not None and not _is_int(w):
            raise _bad(f"sliding_window[{i}]", w, "an integer window size or null (a non-sliding layer)", TypeError)
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
    if not isinstance(layer_types, (list, tuple)) or not all(isinstance(t, str) for t in layer_types):
        raise _bad("layer_types", layer_types, f"a list of {cfg.num_hidden_layers} layer type names", TypeError)
    lt = list(layer_types)
    if len(lt) != cfg.num_hidden_layers:
        raise ValueError(f"SambaYConfig.layer_types: expected {cfg.num_hidden_layers} entries (num_hidden_layers), "
                         f"got {len(lt)}")
    for i, (given, derived) in enumerate(zip(lt, cfg.layer_types)):
        # HF's list only separates sliding from non-sliding layers; it may call Mamba/GMU layers "mamba".
        hf_alias = {"full_attention": ("full_attention", "cross_attention", "mamba", "gmu"),
                    "mamba": ("mamba", "gmu"), "sliding_attention": ("sliding_attention",)}
        ok = given == derived or derived in hf_alias.get(given, ())
        if not ok:
            raise ValueError(f"SambaYConfig.layer_types[{i}]: expected {derived!r} (derived from the SambaY "
                             f"layout), got {given!r}")


def _dtype_name(v: Any) -> Any:
    """A dtype name as config.json writes it: torch.bfloat16 and "torch.bfloat16" both give "bfloat16"."""
    if type(v).__name__ == "dtype" and type(v).__module__ == "torch":  # without importing torch here
        v = str(v)
    return v.removeprefix("torch.") if isinstance(v, str) else v


def _json_kind(v: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(v), "null")


def _with_suggestions(unknown: list[str], fields: set[str]) -> list[str]:
    """'sliding_windw' -> "'sliding_windw' (did you mean 'sliding_window'?)"."""
    out = []
    for k in unknown:
        close = difflib.get_close_matches(k, sorted(fields | HF_KEYS | set(DERIVED)), n=3, cutoff=0.75)
        out.append(f"{k!r} (did you mean {' or '.join(map(repr, close))}?)" if close else repr(k))
    return out
