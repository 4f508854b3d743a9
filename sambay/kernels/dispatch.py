"""The one backend dispatcher: which implementation of an op family runs for a given call.

Vocabulary (:data:`BACKENDS`, the same for every op, layer and ``model.set_backend``):

- ``"auto"``: the family's GPU fast path when the tensors are on CUDA, the path supports the call (dtype,
  layout) and its package imports; the plain-PyTorch twin otherwise. Never a silent downgrade of a broken
  install: a package that is installed but fails to import is reported once (a ``RuntimeWarning`` naming it
  and the error), then the twin runs.
- ``"torch"``: always the twin (each op folder's ``twin.py``, or its ``ref.py`` where that is fast enough).
- ``"cuda"``: insist on the fast path; raise ``RuntimeError`` saying why it cannot run.

Op families, one per op folder, and their fast paths: on CUDA (:data:`FAST_PATHS`) ``conv`` causal_conv1d,
``scan`` mamba_ssm (the chunk scan and its Triton decode step), ``attention`` flash_attn, ``gating`` and
``diff_decode`` (differential attention of one query token, flash-decoding) sambay's own Triton kernels; on CPU
(:data:`CPU_FAST_PATHS`) ``linear`` and ``diff_decode`` sambay's C++ kernels. :func:`fast_path` says which path
takes a call; every probe result lives in one cache (``_PROBES``).

Decided per call from the tensors' device, never from a global that changes math. For CPU tensors the GPU
families call no probe and import nothing; the CPU families (:data:`CPU_FAST_PATHS`) read one cached probe, which
``active_backends("cpu")`` (called by ``set_backend`` and before compiling) fills by building the kernels. So
``torch.compile(fullgraph=True)`` sees no graph break from dispatch. For
CUDA tensors the probes are plain cached values; compute them before tracing (``set_backend`` or
:func:`active_backends` does) so that a compiled region only reads the cache.

The one device hook is :func:`on_cuda`; the CPU contract tests monkeypatch it to send CPU tensors down the CUDA
adapters (through the real upstream packages, see tests/kernels/test_upstream_contracts.py). Triton kernels may
also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), but only when ``"cuda"`` is asked
for explicitly: ``"auto"`` never sends CPU tensors to Triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "torch", "cuda")

# op family -> (backend name reported by active_backends, package to import, modules whose import proves it works)
FAST_PATHS = {
    "conv": ("causal_conv1d", "causal_conv1d", ("causal_conv1d",)),
    "scan": ("mamba_ssm", "mamba_ssm", ("mamba_ssm.ops.selective_scan_interface",
                                        "mamba_ssm.ops.triton.selective_state_update")),
    "attention": ("flash_attn", "flash_attn", ("flash_attn.flash_attn_interface",)),
    "gating": ("triton", "triton", ("triton", "triton.language")),
    "diff_decode": ("triton", "triton", ("triton", "triton.language")),
}
_TRITON_FAMILIES = ("gating", "diff_decode")  # sambay's own Triton kernels: runnable on CPU under the interpreter
# Families with a fast path on CPU tensors: sambay's compiled CPU kernels (sambay.kernels.cpu_native), built on
# first use. "auto" takes them for CPU tensors; "cuda" (insisting on a GPU fast path) cannot insist on them.
CPU_FAST_PATHS = {"linear": "sambay_cpu", "diff_decode": "sambay_cpu"}
_CPU_BUILD = "sambay_cpu"  # the key of the CPU kernels' build in _PROBES (one build for every CPU family)

# family (or _CPU_BUILD) -> None (available) or the reason it is not; filled by the probes, read as a dict lookup.
_PROBES: dict[str, str | None] = {}


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def on_cuda(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is on a CUDA device: the single device check of the dispatcher (tests patch it)."""
    return all(t.is_cuda for t in tensors)


def triton_interpreter() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` set before the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def probe(family: str) -> str | None:
    """None when the family's fast-path package imports, else the reason (cached for the process).

    Not installed: the reason, silently. Installed but the import fails (a missing compiled extension, a
    transformers it cannot import from, ...): one RuntimeWarning naming the package and the error.
    """
    if family in _PROBES:
        return _PROBES[family]
    if torch.compiler.is_compiling():
        raise RuntimeError(f"sambay: the {family} fast path was first probed inside a compiled region; call "
                           f"model.set_backend(...) or sambay.kernels.active_backends(device) before compiling")
    name, package, modules = FAST_PATHS[family]
    reason = None
    if importlib.util.find_spec(package) is None:
        reason = f"{package} is not importable (not installed)"
    else:
        try:
            for module in modules:
                importlib.import_module(module)
        except Exception as e:  # any import-time failure means the fast path cannot run
            reason = f"{package} is installed but failed to import ({type(e).__name__}: {e})"
            warnings.warn(f"sambay: {reason}; the {family} ops use their PyTorch twin", RuntimeWarning, stacklevel=2)
    _PROBES[family] = reason
    return reason


def needs_grad(*args) -> bool:
    """Whether autograd would need a backward through these arguments (the fast kernels have none)."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def clear_probes() -> None:
    """Forget the cached probe results (tests that install or remove packages)."""
    _PROBES.clear()


def use_fast(family: str, backend: str, tensors: tuple[torch.Tensor, ...],
             unsupported: str | Callable[[str], str | None] | None = None) -> bool:
    """Whether this call takes one of the family's fast paths (see :func:`fast_path`)."""
    return fast_path(family, backend, tensors, unsupported) is not None


def fast_path(family: str, backend: str, tensors: tuple[torch.Tensor, ...],
              unsupported: str | Callable[[str], str | None] | None = None) -> str | None:
    """Which of the family's fast paths takes this call: ``"cuda"`` (the GPU path of :data:`FAST_PATHS`, a Triton
    kernel also under the interpreter), ``"cpu"`` (sambay's C++ kernels) or None (the twin).

    Args:
        family: an op family (a key of :data:`FAST_PATHS` and/or :data:`CPU_FAST_PATHS`).
        backend: one of :data:`BACKENDS`.
        tensors: the call's tensors (their device decides).
        unsupported: why the fast path cannot take this call (dtype, layout, ...), or None if it can; a callable
            is asked with the path (``"cuda"`` or ``"cpu"``) once the device has chosen it.
    Raises:
        ValueError for an unknown backend; RuntimeError when ``backend="cuda"`` and no fast path can run.
    """
    check_backend(backend)
    if backend == "torch":
        return None
    if family in FAST_PATHS and (on_cuda(*tensors) or (backend == "cuda" and family in _TRITON_FAMILIES
                                                        and triton_interpreter())):
        return "cuda" if _use_gpu(family, backend, tensors, unsupported) else None
    if family in CPU_FAST_PATHS and (backend == "auto" or family not in FAST_PATHS):
        return "cpu" if _use_cpu(family, backend, tensors, unsupported) else None
    if backend == "auto":
        return None  # CPU tensors: decided here, before any probe or import (compile-safe)
    devices = sorted({str(t.device) for t in tensors})
    hint = " (or TRITON_INTERPRET=1 set before triton is imported)" if family in _TRITON_FAMILIES else ""
    raise RuntimeError(f"backend='cuda' needs CUDA tensors{hint} for the {family} fast path "
                       f"({FAST_PATHS[family][0]}), got tensors on {devices}")


def _why(unsupported, path: str) -> str | None:
    return unsupported(path) if callable(unsupported) else unsupported


def _use_gpu(family: str, backend: str, tensors: tuple[torch.Tensor, ...], unsupported) -> bool:
    if backend == "auto":
        return _why(unsupported, "cuda") is None and probe(family) is None
    # backend == "cuda": the caller insists; say exactly why it cannot run.
    missing = probe(family)
    if missing is not None:
        extra = "install the 'triton' extra" if family in _TRITON_FAMILIES else "pip install 'sambay[cuda]'"
        raise RuntimeError(f"backend='cuda' needs {FAST_PATHS[family][0]} for the {family} ops: {missing}; "
                           f"{extra} or use backend='torch'")
    why = _why(unsupported, "cuda")
    if why is not None:
        raise RuntimeError(f"backend='cuda': {FAST_PATHS[family][0]} cannot take this {family} call: {why}")
    return True


def _use_cpu(family: str, backend: str, tensors: tuple[torch.Tensor, ...], unsupported) -> bool:
    if backend == "cuda":
        # CUDA tensors of a family without a GPU path (the linears: ATen's cuBLAS; quantized weights: the
        # dequantize-matmul twin) take the twin. CPU tensors under "cuda" are refused like every other family's.
        if not on_cuda(*tensors):
            devices = sorted({str(t.device) for t in tensors})
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got tensors on {devices} (the {family} ops' "
                               f"CPU kernels run under backend='auto')")
        return False
    if any(t.device.type != "cpu" for t in tensors) or _why(unsupported, "cpu") is not None:
        return False
    if torch.compiler.is_compiling() and _CPU_BUILD not in _PROBES:
        # not probed before tracing: a build inside the traced region is not possible; the twin is traced
        return False
    return cpu_probe() is None


def cpu_probe() -> str | None:
    """None when sambay's compiled CPU kernels are loaded (built on first call), else why not. Cached."""
    if _CPU_BUILD not in _PROBES:
        from sambay.kernels import cpu_native

        _PROBES[_CPU_BUILD] = cpu_native.build()
    return _PROBES[_CPU_BUILD]


def active_backends(device: torch.device | str) -> dict[str, str]:
    """The backend ``"auto"`` picks on ``device`` for each op family, e.g. on a GPU with everything installed
    ``{"conv": "causal_conv1d", "scan": "mamba_ssm", "attention": "flash_attn", "gating": "triton"}``; a family
    without its fast path reports ``"torch"``. Probes (once per process) and so warms the cache for compiling.

    flash_attn takes only bf16/fp16 calls without padding; the rest of the calls use the twin even when it
    is reported here."""
    device = torch.device(device)
    if device.type != "cuda":
        found = {family: "torch" for family in FAST_PATHS}
        if device.type == "cpu":
            found.update({f: name if cpu_probe() is None else "torch" for f, name in CPU_FAST_PATHS.items()})
        return found
    found = {family: FAST_PATHS[family][0] if probe(family) is None else "torch" for family in FAST_PATHS}
    return found | {family: "torch" for family in CPU_FAST_PATHS if family not in FAST_PATHS}
