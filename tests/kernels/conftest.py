"""Shared setup for the Triton kernel tests: where kernels run, and NaN-poisoned allocations.

Triton's CPU interpreter
------------------------
Without a GPU the kernels run under Triton's interpreter, which ``TRITON_INTERPRET=1`` switches on.
Triton reads that variable when a kernel is *decorated* (``@triton.jit``, i.e. when
``sambay.kernels.gating`` / ``sambay.kernels.gmu`` are first imported; older Triton read it at
``import triton``). This conftest sets it at import time, which pytest does while collecting
``tests/kernels`` -- before any test runs, and before any kernel module is imported, because
``sambay`` / ``sambay.kernels`` import neither triton nor the kernel modules (``has_triton()`` only
imports triton itself, which is harmless on Triton >= 3.4). The one way to defeat this is a test module
collected earlier that imports ``sambay.kernels.gating``/``gmu`` at module level; then the
``kernel_device`` fixture skips with a message instead of failing. To be independent of collection
order, CI may export ``TRITON_INTERPRET=1`` for the whole run on CPU machines: that changes nothing
for CPU tensors with ``backend="auto"`` (they always take the PyTorch twin).

On a CUDA machine the variable is left alone (unless the caller set it), so the same small odd-shape
tests run the compiled kernels on the GPU, and the ``cuda``-marked tests run at realistic sizes.
"""

from __future__ import annotations

import importlib
import math
import os

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
    # (importlib: ``from sambay.kernels import gmu`` would give the dispatch function, not the module)
    gating = importlib.import_module("sambay.kernels.gating")
    gmu = importlib.import_module("sambay.kernels.gmu")
    for kernel in (gating._silu_mul_fwd_kernel, gmu._gmu_fwd_kernel):
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
