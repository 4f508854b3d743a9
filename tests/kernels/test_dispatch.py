"""Backend dispatch of :func:`sambay.kernels.silu_mul` / :func:`sambay.kernels.gmu`.

Rules: ``"auto"`` takes Triton only for CUDA tensors when triton imports (decided per call, from the
tensors); ``"torch"`` always takes the twin; ``"cuda"`` (the fast path, here Triton) insists and says clearly why
it cannot run; anything else is a ValueError. (Before the one backend vocabulary the insisting name was
``"triton"``; it is now an invalid name, like any other.)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sambay import kernels
from sambay.kernels import dispatch, gmu, gmu_ref, silu_mul, silu_mul_ref

REPO = Path(__file__).resolve().parents[2]


def _args(op):
    g = torch.Generator().manual_seed(0)
    if op == "silu_mul":
        u = torch.randn(3, 2 * 7, generator=g)
        return silu_mul, silu_mul_ref, (u[:, :7], u[:, 7:])
    return gmu, gmu_ref, (torch.randn(3, 5, generator=g), torch.randn(6, 5, generator=g),
                          torch.randn(3, 6, generator=g))


OPS = [pytest.param("silu_mul", id="silu_mul"), pytest.param("gmu", id="gmu")]
_TRITON_FN = {"silu_mul": ("sambay.kernels.gating.triton_silu_mul", "silu_mul_triton"),
              "gmu": ("sambay.kernels.gating.triton_gmu", "gmu_triton")}


def _forbid_triton(monkeypatch, op):
    """Make the op's Triton entry point raise, so reaching it fails the test."""
    module, name = _TRITON_FN[op]

    def boom(*args, **kwargs):
        raise AssertionError(f"{name} must not be called here")
    monkeypatch.setattr(importlib.import_module(module), name, boom)


def _no_triton(monkeypatch):
    """The dispatcher's cached probe result for a machine where triton is not installed."""
    monkeypatch.setattr(dispatch, "_PROBES", {"gating": "triton is not importable (not installed)"})


def _spy_triton(monkeypatch, op) -> list:
    module, name = _TRITON_FN[op]
    mod = importlib.import_module(module)
    real, calls = getattr(mod, name), []
    monkeypatch.setattr(mod, name, lambda *a: calls.append(name) or real(*a))
    return calls


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("op", OPS)
def test_cpu_tensors_take_the_twin_even_with_triton(op, backend, monkeypatch):
    """CPU tensors never reach Triton under "auto"/"torch", even when triton imports and the interpreter
    is on (as it is in this test directory)."""
    pytest.importorskip("triton")
    _forbid_triton(monkeypatch, op)
    fn, ref, args = _args(op)
    assert torch.equal(fn(*args, backend=backend), ref(*args))


@pytest.mark.parametrize("op", OPS)
def test_auto_without_triton_takes_the_twin(op, monkeypatch):
    _no_triton(monkeypatch)
    fn, ref, args = _args(op)
    assert torch.equal(fn(*args), ref(*args))


@pytest.mark.triton
@pytest.mark.parametrize("op", OPS)
def test_triton_backend_on_cpu_uses_the_interpreter(op, monkeypatch):
    pytest.importorskip("triton")
    if not kernels.triton_interpreter():
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/kernels/conftest.py on CPU machines)")
    calls = _spy_triton(monkeypatch, op)
    fn, ref, args = _args(op)
    torch.testing.assert_close(fn(*args, backend="cuda"), ref(*args), rtol=1e-5, atol=1e-5)
    assert calls


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_on_cpu_without_interpreter_raises(op, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(dispatch, "triton_interpreter", lambda: False)
    _forbid_triton(monkeypatch, op)
    fn, _, args = _args(op)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET"):
        fn(*args, backend="cuda")


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_without_triton_raises(op, monkeypatch):
    _no_triton(monkeypatch)
    fn, _, args = _args(op)
    with pytest.raises(RuntimeError, match="triton is not importable"):
        fn(*args, backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "Triton", "", None])
@pytest.mark.parametrize("op", OPS)
def test_invalid_backend_raises(op, backend):
    fn, _, args = _args(op)
    with pytest.raises(ValueError, match="backend must be one of"):
        fn(*args, backend=backend)


def test_choice_is_made_per_call_from_the_tensors(monkeypatch):
    """The rule itself, with stand-ins for CUDA tensors (no GPU needed)."""
    cuda, cpu = SimpleNamespace(is_cuda=True, device="cuda:0"), SimpleNamespace(is_cuda=False, device="cpu")
    monkeypatch.setattr(dispatch, "_PROBES", {"gating": None})
    assert dispatch.use_fast("gating", "auto", (cuda, cuda)) is True
    assert dispatch.use_fast("gating", "auto", (cuda, cpu)) is False          # mixed devices: the twin reports it
    assert dispatch.use_fast("gating", "auto", (cpu,)) is False
    assert dispatch.use_fast("gating", "torch", (cuda,)) is False
    _no_triton(monkeypatch)                                                   # same process, next call: no triton
    assert dispatch.use_fast("gating", "auto", (cuda,)) is False


@pytest.mark.parametrize("name", [n for n in kernels.__all__ if n != "BACKENDS"])  # the public functions
def test_no_submodule_shadows_a_public_name(name):
    """Importing a submodule binds it as an attribute of the package: a kernel module named like a public
    function (e.g. ``sambay/kernels/gmu.py``) would replace ``sambay.kernels.gmu`` on first Triton use."""
    assert importlib.util.find_spec(f"sambay.kernels.{name}") is None
    assert callable(getattr(kernels, name))


@pytest.mark.slow
def test_fresh_process_without_interpreter():
    """In a clean interpreter with TRITON_INTERPRET unset: importing sambay.kernels imports no triton,
    "auto" on CPU works, and "triton" on CPU raises the clear error."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import sys, torch
        import sambay.kernels as k
        assert "triton" not in sys.modules, "importing sambay.kernels must not import triton"
        u = torch.randn(4, 10)
        assert torch.equal(k.silu_mul(u[:, :5], u[:, 5:]), k.silu_mul_ref(u[:, :5], u[:, 5:]))
        try:
            k.silu_mul(u[:, :5], u[:, 5:], backend="cuda")
        except RuntimeError as e:
            print("RAISED:", e)
        else:
            print("NO ERROR")
    """)
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "RAISED:" in proc.stdout and "needs CUDA tensors" in proc.stdout, proc.stdout
