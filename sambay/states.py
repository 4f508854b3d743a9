"""The decode state of each stateful layer role, and how attention reads it (the cache layout).

- ``MambaState``: the last ``d_conv - 1`` raw conv inputs (model dtype) and the SSM state (always fp32:
  HF rounds it to bf16 every decode step, a drift source we avoid).
- ``SlidingKV``: a ring of ``min(window, max_length)`` K/V slots; position p lives in slot p % slots and is
  written in place, so a decode step never copies the window.
- ``FullKV``: the context-length K/V of the full-attention layer, which every cross-attention layer reads.

K/V layout (chosen so differential attention reads each byte once with no copy):
    k: (B, 2, Hkv/2, L, D)  -- stripe s = 0/1 holds K heads s, 2+s, 4+s, ... (even/odd heads)
    v: (B, Hkv/2, L, 2D)    -- pair g holds V heads 2g and 2g+1 concatenated (contiguous in Wqkv's output)
Both have time as their second-to-last dimension (``TIME``); attention slices keys with ``[..., cols, :]``.

An attention state's ``update(k, v, at)`` writes the new K/V and returns exactly the keys and values the layer
attends to; ``columns(p0, T)`` says which positions those columns hold (the masks are built from it, once per
call). Which role holds which state, and its shapes, is declared in :data:`sambay.roles.ROLES`; the cache
(:mod:`sambay.cache`) allocates them and owns the length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TIME", "FullKV", "KeyColumns", "MambaState", "SlidingKV"]

TIME = -2  # the time dimension of both k (B, 2, Hkv/2, L, D) and v (B, Hkv/2, L, 2D)


@dataclass(frozen=True)
class KeyColumns:
    """Which positions the key columns returned by ``update`` hold: first ``ring`` (positions held by the
    ring slots, -1 = empty; None when no ring slot is returned), then ``new`` new positions in order
    starting at ``first``."""

    ring: torch.Tensor | None
    first: int
    new: int

    @property
    def ring_size(self) -> int:
        return 0 if self.ring is None else self.ring.numel()


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
        return self.k.shape[TIME]

    def positions(self, last: int | torch.Tensor) -> torch.Tensor:
        """(S,) the position each slot holds once positions 0..last were written (-1 = empty). ``last`` may be
        a (1,) device tensor (the static step)."""
        s = torch.arange(self.slots, device=self.k.device)
        pos = last - torch.remainder(last - s, self.slots)
        return torch.where(pos >= 0, pos, torch.full_like(pos, -1))

    def columns(self, p0: int, T: int) -> KeyColumns:
        """What ``update(k, v, p0)`` with T new tokens returns: one decode token attends the ring after its
        write; a first chunk attends its own keys; a later chunk attends [ring slots as they were | new keys]."""
        if T == 1 and p0 > 0:
            return KeyColumns(self.positions(p0), p0, 0)
        if p0 == 0:
            return KeyColumns(None, 0, T)
        return KeyColumns(self.positions(p0 - 1), p0, T)

    def update(self, k: torch.Tensor, v: torch.Tensor, at: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the K/V of the new positions in place and return what attention reads (see ``columns``).

        Args:
            k: (B, 2, Hkv/2, T, D), v: (B, Hkv/2, T, 2D) of positions at..at+T-1.
            at: the first new position; a (1,) device tensor in the static decode step (T = 1), whose
                write is an ``index_copy_`` and whose columns are the ring's slots.
        """
        S, T = self.slots, k.shape[TIME]
        if isinstance(at, torch.Tensor):  # the static step: no Python int of the position
            slot = torch.remainder(at, S)
            self.k.index_copy_(TIME, slot, k)
            self.v.index_copy_(TIME, slot, v)
            return self.k, self.v
        if T == 1 and at > 0:  # decode: one slice assignment, then the ring in place
            slot = at % S
            self.k.narrow(TIME, slot, 1).copy_(k)
            self.v.narrow(TIME, slot, 1).copy_(v)
            return self.k, self.v
        out = (k, v) if at == 0 else (torch.cat([self.k, k], dim=TIME), torch.cat([self.v, v], dim=TIME))
        keep = min(T, S)  # only the last S new positions can survive in the ring
        slots = torch.arange(at + T - keep, at + T, device=self.k.device) % S
        self.k.index_copy_(TIME, slots, k.narrow(TIME, T - keep, keep))
        self.v.index_copy_(TIME, slots, v.narrow(TIME, T - keep, keep))
        return out


@dataclass
class FullKV:
    k: torch.Tensor  # (B, 2, Hkv/2, max_length, D)
    v: torch.Tensor  # (B, Hkv/2, max_length, 2D)

    def columns(self, p0: int, T: int) -> KeyColumns:
        """``update`` returns every position written so far, in order."""
        return KeyColumns(None, 0, p0 + T)

    def update(self, k: torch.Tensor, v: torch.Tensor, at: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions at..at+T-1 in place; return views of positions 0..at+T-1 (k (B, 2, Hkv/2, at+T, D),
        v (B, Hkv/2, at+T, 2D)). With ``at`` a (1,) device tensor (the static step), return the whole buffers:
        the masks hide the slots after ``at``."""
        if isinstance(at, torch.Tensor):
            self.k.index_copy_(TIME, at, k)
            self.v.index_copy_(TIME, at, v)
            return self.k, self.v
        end = at + k.shape[TIME]
        self.k.narrow(TIME, at, end - at).copy_(k)
        self.v.narrow(TIME, at, end - at).copy_(v)
        return self.k.narrow(TIME, 0, end), self.v.narrow(TIME, 0, end)
