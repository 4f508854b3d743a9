"""The build of sambay's C++ CPU kernels (each op folder's ``cpu_*.cpp``, sharing ``cpu/simd.h``): built on first
use, cached, registered as torch ops (``torch.ops.sambay_cpu.*``, shapes in the C++ files; the Python wrappers are
in the op folders: :mod:`sambay.kernels.linear`, :mod:`sambay.kernels.diff_decode`).

Building needs a C++ compiler and ninja (torch.utils.cpp_extension); the build takes about 20 s once per
machine and torch version and is cached under ``$SAMBAY_CACHE`` (default ``~/.cache/sambay``)``/kernels``. The
kernels need x86-64 with AVX2 and FMA; each op also has an AVX-512 variant (compiled per function, run only where
cpuid reports AVX-512 F/BW/VL/DQ + VNNI), chosen per call (``isa="auto"``) or named (``"avx2"``/``"avx512"``).
Where they cannot be built or run, :func:`build` says why: the ops fall
back to their plain-PyTorch twins, with one ``RuntimeWarning`` when a build was tried and failed. The result is
cached by the dispatcher (:func:`sambay.kernels.dispatch.cpu_probe`).

Fake (meta) implementations are registered too, so ``torch.compile(fullgraph=True)`` traces the ops as extern
calls.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).parent
_SOURCES = (_HERE / "linear" / "cpu_linear.cpp", _HERE / "linear" / "cpu_linear_avx512.cpp",
            _HERE / "diff_decode" / "cpu_diff_decode.cpp", _HERE / "diff_decode" / "cpu_diff_decode_avx512.cpp")
_INCLUDE = _HERE / "cpu"  # simd.h (AVX2 helpers), isa.h (the instruction sets and the AVX-512 kernels' entry points)


def cache_dir() -> Path:
    root = Path(os.environ.get("SAMBAY_CACHE", Path.home() / ".cache" / "sambay"))
    return root / "kernels"


def _unsupported_machine() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU kernels are written for x86-64 with AVX2, this machine is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU kernels need AVX2 and FMA, torch reports CPU capability {capability}"
    return None


def build() -> str | None:
    """None when the ops are loaded (building them the first time), else the reason they cannot be."""
    if torch.compiler.is_compiling():
        raise RuntimeError("sambay: the CPU kernels were first probed inside a compiled region; call "
                           "sambay.kernels.active_backends('cpu') (or model.set_backend('auto')) before compiling")
    reason = _unsupported_machine()
    if reason is None:
        try:
            _load()
        except Exception as e:  # a missing compiler or ninja, a build error: reported, then the twins run
            reason = f"the sambay CPU kernels failed to build ({type(e).__name__}: {str(e).strip()[:500]})"
            warnings.warn(f"sambay: {reason}; linears and decode attention use their PyTorch twins", RuntimeWarning,
                          stacklevel=3)
    return reason


def _load() -> None:
    if not hasattr(torch.ops, "sambay_cpu") or not hasattr(torch.ops.sambay_cpu, "linear_dense"):
        from torch.utils.cpp_extension import load

        text = b"".join(src.read_bytes() for src in (*_SOURCES, _INCLUDE / "simd.h", _INCLUDE / "isa.h"))
        tag = hashlib.sha256(text + torch.__version__.encode()).hexdigest()[:12]
        build = cache_dir() / f"linear-{tag}"
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            print("sambay: building the CPU kernels (once; about 30 s)", file=sys.stderr)
        load(name=f"sambay_cpu_{tag}", sources=[str(src) for src in _SOURCES], build_directory=str(build),
             is_python_module=False, extra_include_paths=[str(_INCLUDE)],
             extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
             extra_ldflags=["-fopenmp"], verbose=False)
    _register_fakes()


_FAKES_DONE: list[bool] = []


def _register_fakes() -> None:
    if _FAKES_DONE:
        return

    @torch.library.register_fake("sambay_cpu::linear_dense")
    def _(x, weight, isa="auto"):
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    for name in ("linear_int8", "linear_int8_a8"):
        @torch.library.register_fake(f"sambay_cpu::{name}")
        def _(x, qweight, scales, isa="auto"):
            return x.new_empty(x.shape[0], qweight.shape[0])

    for name in ("linear_int4", "linear_int4_a8"):
        @torch.library.register_fake(f"sambay_cpu::{name}")
        def _(x, qweight, scales, mins, group_size, isa="auto"):
            return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("sambay_cpu::diff_decode")
    def _(q, k, v, valid, lam, scale, isa="auto"):
        return q.new_empty(k.shape[0], k.shape[2], q.shape[3], v.shape[3])

    _FAKES_DONE.append(True)
