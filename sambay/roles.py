"""SambaY's layer roles, one row each: the mixer it builds, how a block calls it, and its decode state.

Where each role sits in the stack is the config's job (``SambaYConfig.layer_types``); the data flow between the
roles (the memory, the shared K/V, the YOCO cut) is the model's (:mod:`sambay.model`). A new role is one row here
plus its layer in :mod:`sambay.layers` (and its place in ``layer_types``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from sambay.layers import GMU, Attention, CrossAttention, Mamba
from sambay.states import FullKV, MambaState, SlidingKV

if TYPE_CHECKING:
    from sambay.config import SambaYConfig

__all__ = ["ROLES", "Role"]

# What a block can hand a mixer; each mixer names the ones it takes as its parameters after (layer, a).
MIXER_INPUTS = ("step", "state", "memory", "kv", "keep")


@dataclass(frozen=True)
class Role:
    """One layer role.

    build: (config, layer index, {"device", "dtype"}) -> the mixer module.
    mix: (mixer, a, <inputs>) -> (output (B, keep, C), what the model takes from the layer: the memory, the shared
        K/V, or None). ``a`` is the normed input (B, T, C); the inputs it names come from :data:`MIXER_INPUTS`:
        ``step`` (the call's :class:`sambay.model.Step`), ``state`` (this layer's decode state, None without a
        cache), ``memory`` and ``kv`` (the cross-decoder's inputs), ``keep`` (the rows whose output is wanted).
    state: the decode-state class (:mod:`sambay.states`), or None for a role without state.
    state_shapes: (config, batch, max_length) -> {field: (shape, "model" | "ssm")}, the state's tensors in order.
    """

    build: Callable[[SambaYConfig, int, dict], nn.Module]
    mix: Callable
    state: type | None = None
    state_shapes: Callable[[SambaYConfig, int, int], dict] | None = None
    inputs: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        inputs = tuple(inspect.signature(self.mix).parameters)[2:]
        unknown = set(inputs) - set(MIXER_INPUTS)
        if unknown:
            raise TypeError(f"Role: a mixer takes (layer, a) then some of {MIXER_INPUTS}, got {sorted(unknown)}")
        object.__setattr__(self, "inputs", inputs)


# ---- mamba: the self-decoder's SSM layers and the memory layer -------------------------------------
def _build_mamba(c: SambaYConfig, index: int, kw: dict) -> Mamba:
    return Mamba(c.hidden_size, c.d_inner, c.mamba_d_state, c.mamba_d_conv, c.dt_rank, c.mamba_conv_bias,
                 c.mamba_proj_bias, memory_producer=index == c.memory_layer, **kw)


def _mamba(layer: Mamba, a, step, state):
    if state is not None and a.shape[1] == 1:
        return layer.step(a, state, step.pad)  # (out, memory): memory is None except on the memory layer
    return layer(a, step.pad, state, fresh=step.fresh)


def _mamba_state(c: SambaYConfig, batch: int, max_length: int) -> dict:
    return {"conv": ((batch, c.d_inner, c.mamba_d_conv - 1), "model"),
            "ssm": ((batch, c.d_inner, c.mamba_d_state), "ssm")}


# ---- sliding_attention / full_attention: self-attention with its own K/V -----------------------------
def _build_attention(c: SambaYConfig, index: int, kw: dict) -> Attention:
    layer = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.lambda_init(index),
                      **kw)
    layer.inner_cross_attn.dropout = c.attention_dropout
    return layer


def _sliding_attention(layer: Attention, a, step, state):
    q, k, v = layer.project(a)
    if state is not None:
        k, v = state.update(k, v, step.at)  # the ring's keys as SlidingKV.columns describes them
    return layer(q, k, v, step.sliding, step.pad), None


def _full_attention(layer: Attention, a, step, state, keep):
    q, k, v = layer.project(a)
    if state is not None:
        k, v = state.update(k, v, step.at)  # every position so far
    # K/V at every position (they are the shared KV cache), the output only at the last ``keep``.
    return layer(q[:, q.shape[1] - keep:], k, v, step.kept, step.pad_kept), (k, v)


def _kv_state(c: SambaYConfig, batch: int, slots: int) -> dict:
    return {"k": ((batch, 2, c.num_kv_pairs, slots, c.head_dim), "model"),
            "v": ((batch, c.num_kv_pairs, slots, 2 * c.head_dim), "model")}


# ---- gmu / cross_attention: the stateless cross-decoder -------------------------------------------
def _build_gmu(c: SambaYConfig, index: int, kw: dict) -> GMU:
    return GMU(c.hidden_size, c.d_inner, **kw)


def _gmu(layer: GMU, a, memory):
    return layer(a, memory), None


def _build_cross_attention(c: SambaYConfig, index: int, kw: dict) -> CrossAttention:
    layer = CrossAttention(c.hidden_size, c.num_attention_heads, c.head_dim, c.lambda_init(index), **kw)
    layer.inner_cross_attn.dropout = c.attention_dropout
    return layer


def _cross_attention(layer: CrossAttention, a, step, kv):
    return layer(a, *kv, step.kept, step.pad_kept), None


ROLES: dict[str, Role] = {
    "mamba": Role(_build_mamba, _mamba, MambaState, _mamba_state),
    "sliding_attention": Role(_build_attention, _sliding_attention, SlidingKV,
                              lambda c, batch, length: _kv_state(c, batch, min(c.sliding_window, length))),
    "full_attention": Role(_build_attention, _full_attention, FullKV,
                           lambda c, batch, length: _kv_state(c, batch, length)),
    "gmu": Role(_build_gmu, _gmu),
    "cross_attention": Role(_build_cross_attention, _cross_attention),
}
