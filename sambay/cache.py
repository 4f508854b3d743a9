"""SambaYCache: the decode state, allocated once with static shapes, and the protocol to update it.

One small state object per layer (``cache.layers[i]``), of the class and shapes its role declares in
:data:`sambay.roles.ROLES` (``None`` for GMU and cross-attention layers, which own no state); the state
classes and the K/V layout are in :mod:`sambay.states`.

The protocol. A forward call with a cache does ``cache.begin(...)`` (validates, before any state is written),
then each attention layer calls ``state.update(k, v, at)``, which writes its new K/V and returns exactly the
keys and values the layer attends to, whose positions ``state.columns(...)`` describes (the attention masks
are built from that description, once per call), and finally ``cache.advance(T)``. ``begin``/``advance`` are
the only writers of ``length``, ``pos`` and ``valid``. A call that raises between the two leaves the cache
marked invalid: it is refused until ``reset()``, never silently half-advanced.

``cache.length`` is the number of positions seen so far (a Python int mirror of the device tensor
``cache.pos``). The static decode step (graph-capturable) advances ``pos`` on the device only and marks the
mirror stale; reading ``length`` afterwards syncs it once. Benchmarks that need a cache of a given length with
arbitrary (e.g. random) contents use ``cache.seek(length)``.
"""

from __future__ import annotations

import torch

from sambay.config import SambaYConfig
from sambay.roles import ROLES
from sambay.states import TIME, FullKV, KeyColumns, MambaState, SlidingKV

__all__ = ["TIME", "CacheError", "FullKV", "KeyColumns", "MambaState", "SambaYCache", "SlidingKV", "cache_nbytes"]

_SSM_DTYPE = torch.float32


class CacheError(ValueError):
    """A cache that cannot serve this call (wrong model, batch, dtype, device, overflow, or left invalid)."""


def _layer_state_shapes(config: SambaYConfig, batch: int, max_length: int) -> list[dict | None]:
    """Shapes (and dtype kinds) of each layer's state, as its role declares them (None: no state)."""
    return [None if ROLES[role].state is None else ROLES[role].state_shapes(config, batch, max_length)
            for role in config.layer_types]


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


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SambaYCache: expected {name} to be an int >= 1, got {value!r}")


class SambaYCache:
    """Static decode state for one batch of sequences. Build with ``model.allocate_cache(...)``."""

    def __init__(self, config: SambaYConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 tensors: list[torch.Tensor] | None = None):
        """``tensors``: wrap existing state tensors (in the order of ``tensors()``) instead of allocating; the
        exported decode step rebuilds its cache from its inputs this way. The result counts as a cache after
        static steps (its Python length is read from ``pos`` when asked)."""
        if tensors is not None:
            self.config, self.batch_size, self.max_length, self.dtype = config, batch_size, max_length, dtype
            self.device = tensors[0].device
            self._wrap(list(tensors))
            return
        _check_size("batch_size", batch_size)
        _check_size("max_length", max_length)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"SambaYCache: expected a floating torch.dtype, got {dtype!r}")
        self.config = config
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        try:
            self._allocate()
        except (RuntimeError, MemoryError) as e:  # e.g. a huge max_length: say what it would have needed
            need = cache_nbytes(config, batch_size, max_length, dtype)
            raise MemoryError(f"SambaYCache: cannot allocate {need / 2**30:.2f} GiB ({need} bytes) for batch_size="
                              f"{batch_size}, max_length={max_length} in {dtype} on {self.device}: {e}") from None

    def _allocate(self) -> None:
        self._length: int | None = 0
        self._invalid: str | None = None  # why the cache is refused until reset(), or None
        # The same count as a device tensor, for the static (graph-capturable) decode step.
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(self.batch_size, self.max_length, dtype=torch.bool, device=self.device)
        self.has_padding = False
        self.layers: list[MambaState | SlidingKV | FullKV | None] = []
        shapes = _layer_state_shapes(self.config, self.batch_size, self.max_length)
        for role, layer in zip(self.config.layer_types, shapes):
            if layer is None:
                self.layers.append(None)
                continue
            tensors = {name: torch.zeros(shape, dtype=_SSM_DTYPE if kind == "ssm" else self.dtype, device=self.device)
                       for name, (shape, kind) in layer.items()}
            self.layers.append(ROLES[role].state(**tensors))

    def _wrap(self, tensors: list[torch.Tensor]) -> None:
        self._length, self._invalid, self.has_padding = None, None, True
        self.pos, self.valid = tensors[0], tensors[1]
        self.layers, i = [], 2
        for role, layer in zip(self.config.layer_types, _layer_state_shapes(self.config, 1, 1)):
            if layer is None:
                self.layers.append(None)
                continue
            self.layers.append(ROLES[role].state(*tensors[i:i + len(layer)]))
            i += len(layer)

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor: pos, valid, then each layer's (conv, ssm) or (k, v) in layer order."""
        return [self.pos, self.valid] + [t for s in self.layers if s is not None for t in vars(s).values()]

    # ---- what has been seen -----------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Positions seen so far. After static steps (which count on the device) this syncs once."""
        if self._length is None:
            self._length = int(self.pos)
        return self._length

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

    @property
    def ring(self) -> SlidingKV | None:
        """The first sliding layer's ring (every ring has the same slots and positions), or None."""
        return next((s for s in self.layers if isinstance(s, SlidingKV)), None)

    # ---- the protocol: the only writers of length / pos / valid ------------------------------------
    def check(self, config: SambaYConfig, batch_size: int, new_tokens: int | None, dtype: torch.dtype,
              device: torch.device) -> None:
        """Raise a CacheError (before anything is written) if this call cannot continue the cache."""
        if self._invalid is not None:
            raise CacheError(f"the cache is invalid ({self._invalid}); call cache.reset() before reusing it")
        if config is not self.config and config != self.config:
            raise CacheError("cache config mismatch: the cache was allocated for another config (e.g. another "
                             "sliding_window or layout); allocate one with this model's allocate_cache()")
        if batch_size != self.batch_size:
            raise CacheError(f"cache batch size mismatch: the cache holds {self.batch_size} sequences, "
                             f"the input has {batch_size}")
        if dtype != self.dtype or torch.device(device).type != self.device.type:
            raise CacheError(f"cache dtype/device mismatch: the model runs in {dtype} on {device}, the cache "
                             f"was allocated as {self.dtype} on {self.device}")
        if new_tokens is not None and self.length + new_tokens > self.max_length:
            raise CacheError(f"cache overflow: {self.length} tokens cached + {new_tokens} new > max_length="
                             f"{self.max_length}; allocate a larger cache")

    def check_static_room(self) -> None:
        """The static step's overflow check, run where it costs no host sync: when the length is known in Python
        (the mirror: the first static step after a prefill, ``seek`` or ``reset``) or the position lives on the
        CPU (reading it is a memory read, not a sync). After a static step on an accelerator the position exists
        on the device only: reading it would sync every step, so there the check is left to ``generate`` (once
        per call, from its known lengths) and the write past the end stays the device's error."""
        length = self._length
        if length is None and self.pos.device.type == "cpu":
            length = int(self.pos)
        if length is not None and length >= self.max_length:
            raise CacheError(f"cache overflow: the static decode step would write position {length}, past the end "
                             f"of the SambaYCache (max_length={self.max_length}: every position is written); "
                             f"allocate a larger one with allocate_cache(batch_size, max_length), or reset() it")

    def begin(self, T: int, new_valid: torch.Tensor | None = None, padded: bool = False) -> torch.Tensor | None:
        """Start a call of T new tokens at position ``length``: record which are real tokens and mark the cache
        in flight (invalid until ``advance``). new_valid: (B, T) bool, or None when all are real; padded: whether
        new_valid has a False. Returns the (B, length+T) real-token flags of every position so far, or None when
        nothing in the cache was ever padded."""
        p0 = self.length
        self._invalid = "a forward call raised before it finished"
        self.valid[:, p0:p0 + T] = True if new_valid is None else new_valid
        self.has_padding = self.has_padding or padded
        return self.valid[:, :p0 + T] if self.has_padding else None

    def begin_static(self) -> torch.Tensor:
        """``begin`` for the static decode step: the new token's position is ``pos`` (a device tensor)."""
        self._invalid = "a forward call raised before it finished"
        self.valid.index_fill_(1, self.pos, True)
        return self.pos

    def advance(self, T: int) -> None:
        """Commit a call of T new tokens (the last thing a forward does)."""
        self._length = self.length + T
        self.pos.fill_(self._length)
        self._invalid = None

    def advance_static(self) -> None:
        """Commit a static decode step on the device: ``pos += 1`` (replays with a captured graph), the Python
        mirror is re-read from ``pos`` when next asked for."""
        self.pos += 1
        self._length = None
        self._invalid = None

    def resync(self) -> None:
        """Re-read ``length`` from ``pos`` after the tensors were advanced outside a forward call (an exported
        decode program; a replayed CUDA graph needs nothing, its capture already marked the mirror stale)."""
        self._length = None

    def seek(self, length: int) -> None:
        """Treat positions 0..length-1 as real tokens already written, whatever the buffers hold (benchmarks
        and tests use it with random decode states). Positions from ``length`` on are marked unwritten."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.max_length:
            raise ValueError(f"cache.seek: expected an int in [0, max_length={self.max_length}], got {length!r}")
        self.valid[:, :length] = True
        self.valid[:, length:] = False
        self.has_padding = False
        self._length = length
        self.pos.fill_(length)
        self._invalid = None

    def reset(self) -> None:
        """Forget every sequence (zero all state in place) so the cache can be reused."""
        self.seek(0)
        for layer in self.layers:
            if layer is not None:
                for t in vars(layer).values():
                    t.zero_()

    def __repr__(self) -> str:
        return (f"SambaYCache(batch_size={self.batch_size}, max_length={self.max_length}, length={self.length}, "
                f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})")
