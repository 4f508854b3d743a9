"""Weight-only quantization of a SambaY model: which linears, the ``quantization_config`` of config.json, and the
in-place conversion (formats in :mod:`sambay.kernels.linear.ref`, the layer in :mod:`sambay.layers.linear`).

    "int8": per output channel, symmetric;   "int4": groups of ``group_size`` input columns (32/64/128/256), asymmetric.
    activations "int8" (optional, either format): each activation row quantized to 8 bits per block of 32 columns
    before every quantized linear (dynamic, as llama.cpp's Q8_0 activations), so the CPU kernels take integer dot
    products (VNNI). A mode of the same weights: it changes the math (|x - x_hat| <= max|x_block| / 254), not the
    stored tensors. Off by default (see docs/design.md for the numbers).

Quantized: every hot-path linear (Mamba in_proj/x_proj/dt_proj/out_proj, attention and cross-attention
Wqkv/out_proj, GMU in_proj/out_proj, MLP fc1/fc2, the LM head). For int4 a linear whose in_features the group size
does not divide stays dense (the released model's dt_proj, 160 columns, under group_size 128). Everything else
(A_log, D, the lambdas, norms, conv1d, embeddings, biases) keeps its dtype; with tied embeddings the LM head gets
its own quantized copy and ``embed_tokens`` stays exact.

config.json records it HF-style::

    "quantization_config": {"quant_method": "sambay", "format_version": 1, "weights": "int4", "group_size": 128,
                            "modules": ["lm_head", "model.layers.0.attn.in_proj", ...]}

with ``"activations": "int8"`` added when that mode is on (absent: weight-only; a sambay that predates the key
refuses such a config by name rather than computing something else).

A quantized model is for inference, or for training the float parameters around it (norms, embeddings, adapters):
the quantized buffers are not parameters and get no gradient; the layers' inputs do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sambay.kernels.linear.ref import INT4_GROUP_SIZES
from sambay.layers.linear import Linear, QuantLinear

__all__ = ["ACTIVATIONS", "DEFAULT_GROUP_SIZE", "FORMAT_VERSION", "QUANT_METHOD", "WEIGHTS", "QuantizationConfig",
           "describe", "quantize_model", "set_activations"]

QUANT_METHOD = "sambay"
FORMAT_VERSION = 1
WEIGHTS = {"int8": 8, "int4": 4}  # name -> bits
DEFAULT_GROUP_SIZE = 128
_KEYS = ("quant_method", "format_version", "weights", "group_size", "modules")
_OPTIONAL_KEYS = ("activations",)
ACTIVATIONS = (None, "int8")
_HANDLED = (f"quant_method {QUANT_METHOD!r}, format_version {FORMAT_VERSION} (weight-only 'int8', or 'int4' with "
            f"group_size in {INT4_GROUP_SIZES})")


@dataclass(frozen=True)
class QuantizationConfig:
    """What is quantized and how: ``weights`` "int8" or "int4", ``group_size`` (int4 only, else None), the exact
    module names (sorted) and ``activations`` (None: weight-only; "int8": 8-bit activations per block of 32)."""

    weights: str
    group_size: int | None
    modules: tuple[str, ...]
    activations: str | None = None

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"quantization_config.weights: expected one of {sorted(WEIGHTS)}, got {self.weights!r}")
        check_activations(self.activations, "quantization_config.activations")
        check_group_size(self.weights, self.group_size, "quantization_config.group_size")
        mods = self.modules
        if isinstance(mods, str) or not isinstance(mods, (list, tuple)) or not all(isinstance(m, str) for m in mods):
            raise TypeError(f"quantization_config.modules: expected a list of module names, got {mods!r:.100}")
        if not mods or len(set(mods)) != len(mods):
            raise ValueError(f"quantization_config.modules: expected a non-empty list of distinct module names, got "
                             f"{list(mods)!r:.200}")
        object.__setattr__(self, "modules", tuple(sorted(mods)))

    @property
    def bits(self) -> int:
        return WEIGHTS[self.weights]

    def to_dict(self) -> dict:
        d = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "weights": self.weights,
             "group_size": self.group_size, "modules": list(self.modules)}
        if self.activations is not None:
            d["activations"] = self.activations
        return d

    @classmethod
    def from_dict(cls, d: Any) -> QuantizationConfig:
        """Validate config.json's ``quantization_config``: exactly this format, or a ValueError naming what was found
        and what this code handles (another quant_method such as bitsandbytes or gptq, a newer format_version)."""
        if not isinstance(d, dict):
            raise TypeError(f"quantization_config: expected an object ({_HANDLED}), got {d!r:.100}")
        method, version = d.get("quant_method"), d.get("format_version")
        if method != QUANT_METHOD:
            raise ValueError(f"quantization_config: quant_method {method!r} is not a format sambay reads; it handles "
                             f"{_HANDLED} (found {_short(d)})")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise ValueError(f"quantization_config.format_version: this sambay reads format_version {FORMAT_VERSION}, "
                             f"found {version!r} (written by another sambay version?)")
        unknown = sorted(set(d) - set(_KEYS) - set(_OPTIONAL_KEYS))
        missing = sorted(set(_KEYS) - set(d))
        if unknown or missing:
            raise ValueError(f"quantization_config: expected the keys {list(_KEYS)} (and optionally "
                             f"{list(_OPTIONAL_KEYS)}); "
                             + "; ".join(p for p in (f"unknown {unknown}" if unknown else "",
                                                     f"missing {missing}" if missing else "") if p))
        return cls(d["weights"], d["group_size"], d["modules"], d.get("activations"))


def _short(d: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in d.items() if k != "modules")[:200] or "{}"


def check_group_size(weights: str, group_size: Any, name: str = "group_size") -> None:
    if weights == "int8":
        if group_size is not None:
            raise ValueError(f"{name}: int8 is per output channel (no groups): expected None, got {group_size!r}")
    elif isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{name}: int4 needs one of {INT4_GROUP_SIZES}, got {group_size!r}")


def check_activations(activations: Any, name: str = "activations") -> None:
    if isinstance(activations, bool) or activations not in ACTIVATIONS:
        raise ValueError(f"{name}: expected None (weight-only) or 'int8' (8-bit activations), got {activations!r}")


def resolve(weights: Any, group_size: Any = None, activations: Any = None) -> tuple[str, int | None, str | None]:
    """The user's (weights, group_size, activations) checked; int4's group_size defaults to 128."""
    if weights not in WEIGHTS:
        raise ValueError(f"quantize: expected weights 'int8' or 'int4', got {weights!r}")
    if weights == "int4" and group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    check_group_size(weights, group_size)
    check_activations(activations)
    return weights, group_size, activations


def _linears(model: nn.Module) -> dict[str, Linear]:
    """The model's dense sambay linears by module name (a wrapped one, e.g. a LoRA layer, is not among them)."""
    return {name: m for name, m in model.named_modules() if type(m) is Linear}


def plan(model: nn.Module, weights: str, group_size: int | None, activations: str | None = None) -> QuantizationConfig:
    """The linears of ``model`` that ``weights``/``group_size`` quantize (int4: in_features divisible by G)."""
    names = [n for n, m in _linears(model).items() if weights == "int8" or m.in_features % group_size == 0]
    if not names:
        raise ValueError(f"quantize: no linear of this model can be quantized to {weights} with group_size "
                         f"{group_size} (int4 needs in_features divisible by the group size)")
    return QuantizationConfig(weights, group_size, tuple(names), activations)


@torch.no_grad()
def convert(model: nn.Module, qc: QuantizationConfig) -> None:
    """Replace each linear that ``qc`` names by a QuantLinear, one at a time (each dense weight is freed as soon as
    its module is replaced, unless something else holds it: the tied embedding). On the meta device the
    QuantLinears are empty, for the loader to fill. Then the model's config records ``qc``."""
    linears = _linears(model)
    problems = [f"{n} (not a dense linear of this model)" for n in qc.modules if n not in linears]
    problems += [f"{n} (in_features {linears[n].in_features} not divisible by group_size {qc.group_size})"
                 for n in qc.modules if n in linears and qc.bits == 4 and linears[n].in_features % qc.group_size]
    if problems:
        raise ValueError(f"quantization_config.modules: cannot quantize {len(problems)} module(s): "
                         + ", ".join(problems[:10]))
    del linears  # hold names only, so that each replaced module (and its weight) can be freed right away
    for name in qc.modules:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        dense = getattr(owner, child)
        w = dense.weight
        if w.is_meta:
            q = QuantLinear(dense.in_features, dense.out_features, qc.bits, qc.group_size, bias=dense.bias is not None,
                            dtype=w.dtype, device="meta", activations=qc.activations)
        else:
            q = QuantLinear.from_linear(dense, qc.bits, qc.group_size, qc.activations)
        q.backend = dense.backend
        setattr(owner, child, q)
        del dense, w, q
    model._set_quantization_config(qc)


def quantize_model(model: nn.Module, weights: str, group_size: int | None = None,
                   activations: str | None = None) -> QuantizationConfig:
    """Quantize a loaded float SambaY LM (SambaYForCausalLM or the transformers class) in place; see the module doc.
    Returns the QuantizationConfig now in ``model.config``. Errors: already quantized, on the meta device,
    not a float model."""
    weights, group_size, activations = resolve(weights, group_size, activations)
    if not hasattr(model, "_set_quantization_config"):
        raise TypeError(f"quantize: expected a SambaY causal LM (SambaYForCausalLM), got {type(model).__name__}")
    done = describe(model)
    if done is not None:
        g = f", group_size {done.group_size}" if done.group_size else ""
        raise ValueError(f"quantize: the model is already quantized ({done.weights}{g}, {len(done.modules)} "
                         f"modules); quantize a float model (load the float checkpoint again)")
    linears = _linears(model)
    meta = sorted(n for n, m in linears.items() if m.weight.is_meta)
    if meta:
        raise ValueError(f"quantize: {len(meta)} linear(s) are on the meta device (no weights to quantize), e.g. "
                         f"{meta[0]}; load the weights first")
    not_float = sorted(f"{n} ({m.weight.dtype})" for n, m in linears.items() if not m.weight.is_floating_point())
    if not_float:
        raise TypeError(f"quantize: expected float weights, got {', '.join(not_float[:5])}")
    qc = plan(model, weights, group_size, activations)
    del linears
    convert(model, qc)
    return qc


def describe(model: nn.Module) -> QuantizationConfig | None:
    """The QuantizationConfig of ``model``'s QuantLinears (None when it has none): what saving writes."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    kinds = {(m.bits, m.group_size, m.activations) for m in found.values()}
    if not found:
        return None
    if len(kinds) > 1:
        raise ValueError(f"the model mixes quantized formats {sorted(kinds, key=str)}; config.json records one")
    bits, group_size, activations = kinds.pop()
    return QuantizationConfig("int8" if bits == 8 else "int4", group_size, tuple(found), activations)


def set_activations(model: nn.Module, activations: str | None) -> QuantizationConfig:
    """Switch a quantized model between weight-only (None) and 8-bit activations ("int8"): the weights stay as
    they are. Returns the QuantizationConfig now in ``model.config``."""
    check_activations(activations)
    qc = describe(model)
    if qc is None:
        raise ValueError("set_activations: the model is not quantized (activations apply to int8/int4 weights)")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.activations = activations
    qc = dataclasses.replace(qc, activations=activations)
    model._set_quantization_config(qc)
    return qc
