"""The static decode step, compiled or exported once per model.

``decode_step(model)`` is ``torch.compile(fullgraph=True)`` of one static step (``model(token, cache=cache,
static=True)``): no graph break, and no recompilation across positions or across caches of the same shapes,
because the step reads no Python int of the cache (the position is the device tensor ``cache.pos``) and every
shape in it is fixed by (batch size, cache length). On CUDA it uses mode ``reduce-overhead`` (CUDA graphs) with
the cache tensors marked as static addresses, so the graph writes them in place. The prefill stays eager: its
shapes change with every prompt.

``export_decode_step(model, cache)`` is ``torch.export`` of the same step with the cache tensors as inputs that
the program mutates in place, so the exported program is a complete decode step.

The kernel backend is still chosen per call from the tensors' device (sambay.kernels); that choice reads only
values fixed before tracing, so it neither breaks the graph nor changes the math.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable

import torch
from torch import nn

from sambay.cache import SambaYCache
from sambay.kernels import active_backends

__all__ = ["DecodeStep", "decode_step", "export_decode_step"]

# One compiled step per (model, mode): torch.compile's own guards then key it by batch size and cache length.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static_step(model, token: torch.Tensor, cache: SambaYCache) -> torch.Tensor:
    """token (B,) -> next-token logits (B, V); advances ``cache.pos`` on the device."""
    return model(token[:, None], cache=cache, static=True, logits_to_keep=1).logits[:, -1]


class _Reporting:
    """The compiled step; its first call (where compilation happens) is timed and reported once on stderr."""

    def __init__(self, fn: Callable, model, report: bool):
        self.fn, self.model, self.report = fn, model, report
        self.seen: set[tuple] = set()

    def __call__(self, token: torch.Tensor, cache: SambaYCache) -> torch.Tensor:
        key = (cache.batch_size, cache.max_length, cache.dtype, cache.device)
        cache.check_static_room()  # host code: free where the length is known here (see SambaYCache)
        if cache.device.type == "cuda":
            for t in cache.tensors():  # CUDA graphs may then write the cache in place
                torch._dynamo.mark_static_address(t)
        if key in self.seen:
            return self.fn(self.model, token, cache)
        t0 = time.perf_counter()
        out = self.fn(self.model, token, cache)
        self.seen.add(key)
        if self.report:
            print(f"sambay: compiled the decode step for batch {key[0]}, cache length {key[1]} in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return out


def decode_step(model, mode: str | None = None, backend: str = "inductor", report: bool = True) -> Callable:
    """The compiled static decode step of ``model``: ``step(token (B,), cache) -> logits (B, V)``.

    Args:
        mode: torch.compile mode; default ``reduce-overhead`` (CUDA graphs) for a CUDA model, else None.
        backend: torch.compile backend (tests use ``aot_eager`` to check tracing without code generation).
        report: print the compile time once per (batch size, cache length) on stderr.
    """
    device = next(model.parameters()).device
    active_backends(device)  # run the fast paths' probes (and build the CPU kernels) before anything is traced
    if mode is None and device.type == "cuda":
        mode = "reduce-overhead"
    key = (mode, backend)
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        fn = torch.compile(_static_step, fullgraph=True, dynamic=False, mode=mode, backend=backend)
        per_model[key] = _Reporting(fn, model, report)
    return per_model[key]


class DecodeStep(nn.Module):
    """The static decode step as a module whose inputs are the token and every cache tensor (``cache.tensors()``
    order), which it updates in place: forward(token (B,), *tensors) -> logits (B, V)."""

    def __init__(self, model: nn.Module, cache: SambaYCache):
        super().__init__()
        self.model = model
        self._layout = (cache.config, cache.batch_size, cache.max_length, cache.dtype)

    def forward(self, token: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return _static_step(self.model, token, SambaYCache(*self._layout, tensors=list(tensors)))


def export_decode_step(model, cache: SambaYCache) -> torch.export.ExportedProgram:
    """``torch.export`` of the static decode step for caches shaped like ``cache``. Call the result as
    ``program.module()(token, *cache.tensors())``: it returns the logits and advances the cache tensors in place
    (then ``cache.resync()`` before reading ``cache.length`` in Python)."""
    token = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.device)
    active_backends(cache.device)
    with torch.no_grad():  # export traces with fake tensors: the cache itself is not advanced
        return torch.export.export(DecodeStep(model, cache), (token, *cache.tensors()))
