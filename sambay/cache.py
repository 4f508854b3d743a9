"""SambaYCache: the decode state, allocated once with static shapes.

One small state object per layer role (``cache.layers[i]``; ``None`` for GMU and cross-attention
layers, which own no state):

- ``MambaState``: the last ``d_conv - 1`` raw conv inputs (model dtype) and the SSM state (always fp32:
  HF rounds it to bf16 every decode step, a drift source we avoid).
- ``SlidingKV``: a ring of ``min(window, max_length)`` K/V slots; position p lives in slot p % slots and is
  written in place, so a decode step never copies the window.
- ``FullKV``: the context-length K/V of the full-attention layer, which every cross-attention layer reads.

K/V layout (chosen so differential attention reads each byte once with no copy):
    k: (B, 2, Hkv/2, L, D)  -- stripe s = 0/1 holds K heads s, 2+s, 4+s, ... (even/odd heads)
    v: (B, Hkv/2, L, 2D)    -- pair g holds V heads 2g and 2g+1 concatenated (contiguous in Wqkv's output)

``cache.length`` (a Python int: the tokens seen so far) is advanced by the model only, and
``cache.valid`` (B, max_length) records which positions are real tokens (False under left padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sambay.config import SambaYConfig

_SSM_DTYPE = torch.float32


@dataclass
class MambaState:
    conv: torch.Tensor  # (B, E, K-1) the last d_conv-1 raw inputs of the conv, oldest first
    ssm: torch.Tensor  # (B, E, N) fp32


@dataclass
class SlidingKV:
    k: torch.Tensor  # (B, 2, Hkv/2, S, D) with S = min(window, max_length) ring slots
    v: torch.Tensor  # (B, Hkv/2, S, 2D)

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    def positions(self, last: int) -> torch.Tensor:
        """(S,) the position each slot holds once positions 0..last were written (-1 = empty)."""
        s = torch.arange(self.slots, device=self.k.device)
        pos = last - torch.remainder(last - s, self.slots)
        return torch.where(pos >= 0, pos, torch.full_like(pos, -1))

    def write(self, k: torch.Tensor, v: torch.Tensor, p0: int) -> None:
        """Write new K/V for positions p0..p0+T-1 in place (only the last ``slots`` can survive).
        k: (B, 2, Hkv/2, T, D), v: (B, Hkv/2, T, 2D)."""
        T, S = k.shape[3], self.slots
        if T == 1:  # the decode step: one slice assignment, no index tensor
            slot = p0 % S
            self.k[:, :, :, slot:slot + 1] = k
            self.v[:, :, slot:slot + 1] = v
            return
        keep = min(T, S)
        slots = torch.arange(p0 + T - keep, p0 + T, device=self.k.device) % S
        self.k.index_copy_(3, slots, k[:, :, :, T - keep:])
        self.v.index_copy_(2, slots, v[:, :, T - keep:])

    def write_at(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """The decode write with the position as a (1,) device tensor (static shapes, graph-capturable)."""
        slot = torch.remainder(pos, self.slots)
        self.k.index_copy_(3, slot, k)
        self.v.index_copy_(2, slot, v)


@dataclass
class FullKV:
    k: torch.Tensor  # (B, 2, Hkv/2, max_length, D)
    v: torch.Tensor  # (B, Hkv/2, max_length, 2D)

    def write(self, k: torch.Tensor, v: torch.Tensor, p0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions p0..p0+T-1 in place; return views of every position written so far."""
        end = p0 + k.shape[3]
        self.k[:, :, :, p0:end] = k
        self.v[:, :, p0:end] = v
        return self.k[:, :, :, :end], self.v[:, :, :end]

    def write_at(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one position given as a (1,) device tensor; return the whole buffers (static shapes)."""
        self.k.index_copy_(3, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


def _layer_state_shapes(config: SambaYConfig, batch: int, max_length: int) -> list[dict | None]:
    """Shapes (and dtype kinds) of each layer's state: the single source of the cache layout."""
    c = config
    shapes: list[dict | None] = []
    for role in c.layer_types:
        if role == "mamba":
            shapes.append({"conv": ((batch, c.d_inner, c.mamba_d_conv - 1), "model"),
                           "ssm": ((batch, c.d_inner, c.mamba_d_state), "ssm")})
        elif role in ("sliding_attention", "full_attention"):
            slots = min(c.sliding_window, max_length) if role == "sliding_attention" else max_length
            shapes.append({"k": ((batch, 2, c.num_kv_pairs, slots, c.head_dim), "model"),
                           "v": ((batch, c.num_kv_pairs, slots, 2 * c.head_dim), "model")})
        else:
            shapes.append(None)
    return shapes


def cache_nbytes(config: SambaYConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.bfloat16) -> int:
    """Decode-state bytes from the formula, without allocating (size a deployment with this).

    K/V and conv windows are in ``dtype``; the SSM state is fp32. The validity mask (1 byte per
    position) is included.
    """
    item = {"model": torch.empty((), dtype=dtype).element_size(),
            "ssm": torch.empty((), dtype=_SSM_DTYPE).element_size()}
    total = batch_size * max_length  # cache.valid, bool
    for layer in _layer_state_shapes(config, batch_size, max_length):
        for shape, kind in (layer or {}).values():
            n = 1
            for s in shape:
                n *= s
            total += n * item[kind]
    return total


class SambaYCache:
    """Static decode state for one batch of sequences. Build with ``model.allocate_cache(...)``."""

    def __init__(self, config: SambaYConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"SambaYCache: expected batch_size >= 1 and max_length >= 1, "
                             f"got batch_size={batch_size}, max_length={max_length}")
        self.config = config
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.length = 0
        # The same count as a device tensor, for the static (graph-capturable) decode step.
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=self.device)
        self.has_padding = False
        self.layers: list[MambaState | SlidingKV | FullKV | None] = []
        classes = {"mamba": MambaState, "sliding_attention": SlidingKV, "full_attention": FullKV}
        for role, shapes in zip(config.layer_types, _layer_state_shapes(config, batch_size, max_length)):
            if shapes is None:
                self.layers.append(None)
                continue
            tensors = {name: torch.zeros(shape, dtype=_SSM_DTYPE if kind == "ssm" else dtype, device=self.device)
                       for name, (shape, kind) in shapes.items()}
            self.layers.append(classes[role](**tensors))

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated by this cache's tensors."""
        total = self.valid.numel() * self.valid.element_size()
        for layer in self.layers:
            if layer is not None:
                for t in vars(layer).values():
                    total += t.numel() * t.element_size()
        return total

    @property
    def shared_kv(self) -> FullKV:
        """The full-attention layer's K/V, read by every cross-attention layer."""
        return self.layers[self.config.kv_layer]

    def reset(self) -> None:
        """Forget every sequence (zero all state in place) so the cache can be reused."""
        self.length = 0
        self.pos.zero_()
        self.has_padding = False
        self.valid.zero_()
        for layer in self.layers:
            if layer is not None:
                for t in vars(layer).values():
                    t.zero_()

    def seek(self, length: int) -> None:
        """Declare positions [0, length) real tokens already written, leaving every buffer untouched:
        ``valid[:, :length] = True``, ``length = pos = length``. For benchmarks that fill the state with
        random values instead of prefilling ``length`` tokens."""
        if not 0 <= length <= self.max_length:
            raise ValueError(f"cache.seek: expected 0 <= length <= max_length={self.max_length}, got {length}")
        self.valid[:, :length] = True
        self.length = length
        self.pos.fill_(length)

    def check(self, batch_size: int, new_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise a clear error if a call of ``new_tokens`` tokens cannot continue this cache."""
        if batch_size != self.batch_size:
            raise ValueError(f"cache batch size mismatch: the cache holds {self.batch_size} sequences, "
                             f"the input has {batch_size}")
        if self.length + new_tokens > self.max_length:
            raise ValueError(f"cache overflow: {self.length} tokens cached + {new_tokens} new > max_length="
                             f"{self.max_length}; allocate a larger cache")
        if dtype != self.dtype or torch.device(device).type != self.device.type:
            raise ValueError(f"cache dtype/device mismatch: the model runs in {dtype} on {device}, the cache "
                             f"was allocated as {self.dtype} on {self.device}")

    def __repr__(self) -> str:
        return (f"SambaYCache(batch_size={self.batch_size}, max_length={self.max_length}, length={self.length}, "
                f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})")
