"""Shared setup for the Triton kernel tests: where kernels run, and NaN-poisoned allocations.

Triton's CPU interpreter
------------------------
Without a GPU the kernels run under Triton's interpreter, which ``TRITON_INTERPRET=1`` switches on.
Triton reads that variable when a kernel is *decorated* (``@triton.jit``, i.e. when a kernel module such as
``sambay.kernels.gating.triton_silu_mul`` is first imported; older Triton read it at
``import triton``). This conftest sets it at import time, which pytest does while collecting
``tests/kernels`` -- before any test runs, and before any kernel module is imported, because
``sambay`` / ``sambay.kernels`` import neither triton nor the kernel modules (``has_triton()`` only
imports triton itself, which is harmless: checked on Triton 3.7). The one way to defeat this is a test
module collected earlier that imports a ``sambay.kernels.*.triton_*`` module at module level; then the
``kernel_device`` fixture skips with a message instead of failing. To be independent of collection
order, ``.ci/run`` also exports ``TRITON_INTERPRET=1`` for the whole run: that changes nothing for CPU
tensors with ``backend="auto"`` (they never take a Triton kernel).

On a CUDA machine the variable is left alone (unless the caller set it), so the same small odd-shape
tests run the compiled kernels on the GPU, and the ``cuda``-marked tests run at realistic sizes.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreting() -> bool:
    from sambay.kernels import triton_interpreter

    return triton_interpreter()


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """The device the Triton kernel tests run on: CUDA (compiled) if present, else CPU (interpreter)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() and not _interpreting():
        return torch.device("cuda")
    if not _interpreting():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    gating = importlib.import_module("sambay.kernels.gating.triton_silu_mul")
    gmu_matmul = importlib.import_module("sambay.kernels.gating.triton_gmu")
    for kernel in (gating._silu_mul_fwd_kernel, gmu_matmul._gmu_fwd_kernel):
        if type(kernel).__name__ != "InterpretedFunction":
            pytest.skip("the kernel modules were imported before TRITON_INTERPRET=1 was set; "
                        "run pytest with TRITON_INTERPRET=1 in the environment")
    return torch.device("cpu")


@pytest.fixture
def poison_empty(monkeypatch) -> list:
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled float tensors for this test.

    A kernel that leaves an output element unwritten then shows it as NaN. Returns the list of poisoned
    shapes, so a test can assert that the kernel's outputs really came through the poisoned allocator.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like
    poisoned: list = []

    def _poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(math.nan)
            poisoned.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    return poisoned


@pytest.fixture(scope="session")
def within_ulps():
    """The :func:`ulp_distance_ok` check, as a fixture so test modules need not import this conftest."""
    return ulp_distance_ok


def ulp_distance_ok(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1) -> bool:
    """Whether ``actual`` is within ``ulps`` units in the last place (of its own dtype) of ``expected``,
    elementwise, with NaNs required in the same positions. Differences below the smallest normal number
    also pass: GPU math may flush subnormal results to zero."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.double(), expected.double()
    if not torch.equal(a.isnan(), e.isnan()):
        return False
    finite = ~e.isnan()
    a, e = a[finite], e[finite]
    info = torch.finfo(actual.dtype)
    mag = torch.maximum(a.abs(), e.abs()).clamp_min(info.tiny)
    ulp = info.eps * torch.exp2(torch.floor(torch.log2(mag)))
    close = (a == e) | ((a - e).abs() <= torch.clamp_min(ulps * ulp, info.tiny))   # a == e: equal infinities
    return bool(close.all())


# --------------------------------------------------------------------------------------- GPU codegen check
_CODEGEN_SCRIPT = r"""
import importlib, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

for case in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    consts = {k: getattr(tl, v["tl"]) if isinstance(v, dict) else v for k, v in case["constexprs"].items()}
    sig = {name: case["signature"].get(name, "constexpr") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in case["divisible"]}
    for arch in case["archs"]:
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=case["options"])
        ptx = compiled.asm["ptx"]
        print(json.dumps({"kernel": case["kernel"], "arch": arch, "shared": compiled.metadata.shared,
                          "ld_v4": ptx.count("ld.global.v4"), "st_v4": ptx.count("st.global.v4"),
                          "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync")}))
"""


@pytest.fixture(scope="session")
def gpu_codegen():
    """Compile kernels to PTX for real NVIDIA targets *without a GPU* (Triton ships ptxas), so CPU-only CI
    catches GPU-only compile errors the interpreter never sees, and checks codegen properties (16-byte
    vector loads, tensor-core instructions, shared memory). Each case names a kernel, its non-constexpr
    argument types, its constexprs (``{"tl": "float32"}`` for a dtype), the arguments to treat as
    16-divisible (as the JIT specializes aligned pointers and strides) and the target archs. Runs in a
    subprocess with TRITON_INTERPRET unset, since this process holds the interpreted kernels.
    Returns ``compile(cases) -> [{kernel, arch, shared, ld_v4, st_v4, wgmma, mma_sync}, ...]``.
    """
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip("the GPU codegen check uses Triton 3.7's ASTSource/GPUTarget API")
    repo = Path(__file__).resolve().parents[2]

    def compile_cases(cases: list[dict]) -> list[dict]:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-c", _CODEGEN_SCRIPT, json.dumps(cases)], env=env, cwd=repo,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"GPU codegen failed:\n{proc.stderr[-4000:]}"
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return compile_cases
