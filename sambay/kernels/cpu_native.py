"""sambay's compiled CPU kernels (``kernels/cpu/linear.cpp``): built on first use, cached, registered as torch ops.

The ops (``torch.ops.sambay_cpu.linear_dense / linear_int8 / linear_int4``, see the C++ file for shapes) stream a
linear's weight once with fp32 accumulation: batch-1 decode on a CPU is bound by the speed at which weights come
from memory, and ATen's bf16 and weight-only int8/int4 matmuls reach about 60-70% of it on AVX2 machines.

Building needs a C++ compiler and ninja (torch.utils.cpp_extension); the build takes about 20 s once per
machine and torch version and is cached under ``$SAMBAY_CACHE`` (default ``~/.cache/sambay``)``/kernels``. The
kernels need x86-64 with AVX2 and FMA. Where they cannot be built or run, :func:`probe` says why: the ops fall
back to their plain-PyTorch twins (``quant_ref``), with one ``RuntimeWarning`` when a build was tried and failed.

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

_SOURCES = (Path(__file__).parent / "cpu" / "linear.cpp", Path(__file__).parent / "cpu" / "decode.cpp")
_STATE: dict[str, str | None] = {}  # "reason": None when loaded, else why not


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


def probe() -> str | None:
    """None when the ops are loaded (building them the first time), else the reason they cannot be. Cached."""
    if "reason" in _STATE:
        return _STATE["reason"]
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
    _STATE["reason"] = reason
    return reason


def _load() -> None:
    if not hasattr(torch.ops, "sambay_cpu") or not hasattr(torch.ops.sambay_cpu, "linear_dense"):
        from torch.utils.cpp_extension import load

        text = b"".join(src.read_bytes() for src in (*_SOURCES, _SOURCES[0].parent / "simd.h"))
        tag = hashlib.sha256(text + torch.__version__.encode()).hexdigest()[:12]
        build = cache_dir() / f"linear-{tag}"
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            print("sambay: building the CPU kernels (once; about 30 s)", file=sys.stderr)
        load(name=f"sambay_cpu_{tag}", sources=[str(src) for src in _SOURCES], build_directory=str(build),
             is_python_module=False, extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
             extra_ldflags=["-fopenmp"], verbose=False)
    _register_fakes()


_FAKES_DONE: list[bool] = []


def _register_fakes() -> None:
    if _FAKES_DONE:
        return

    @torch.library.register_fake("sambay_cpu::linear_dense")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("sambay_cpu::linear_int8")
    def _(x, qweight, scales):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("sambay_cpu::linear_int4")
    def _(x, qweight, scales, mins, group_size):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("sambay_cpu::diff_decode")
    def _(q, k, v, valid, lam, scale):
        return q.new_empty(k.shape[0], k.shape[2], q.shape[3], v.shape[3])

    _FAKES_DONE.append(True)


# ------------------------------------------------------------------------------------------ decode attention
def diff_decode_cpu(q1: torch.Tensor, q2: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                    lam: torch.Tensor, scale: float) -> torch.Tensor:
    """Differential attention of one query row, K/V read once in their own dtype. As ``diff_decode_ref``: the math
    in fp32, rounded once to q's dtype; a sequence with no visible slot gets zeros.

    Args: q1, q2 (B, H2, 1, D) the two maps' queries (diff head j reads kv pair j // (H2 / G)); k (B, 2, G, S, D),
    v (B, G, S, 2D) (bf16, fp16 or fp32, unit last stride); valid (B, S) bool or None (all visible); lam 0-d.
    Returns (B, H2, 1, 2D).
    """
    B, H2, _, D = q1.shape
    G = k.shape[2]
    R = H2 // G
    q = torch.stack([q1[:, :, 0], q2[:, :, 0]], dim=1).view(B, 2, G, R, D).transpose(1, 2)  # (B, G, 2, R, D)
    valid = q.new_empty(0, dtype=torch.bool) if valid is None else valid.contiguous()
    lam32 = lam.detach().float().reshape(1) if isinstance(lam, torch.Tensor) else torch.tensor([float(lam)])
    out = torch.ops.sambay_cpu.diff_decode(q.float().contiguous(), k, v, valid, lam32, float(scale))  # (B, G, R, 2D)
    return out.reshape(B, H2, 1, 2 * D).to(q1.dtype)
