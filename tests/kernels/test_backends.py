"""The one backend vocabulary and the dispatcher's rules: probes, warnings, active_backends, compile safety."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from sambay import kernels
from sambay.kernels import dispatch


@pytest.fixture
def fresh_probes(monkeypatch):
    monkeypatch.setattr(dispatch, "_PROBES", {})


def _fake_package(tmp_path, monkeypatch, name, body):
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_installed_but_broken_package_warns_once_and_takes_the_twin(tmp_path, monkeypatch, fresh_probes):
    _fake_package(tmp_path, monkeypatch, "sambay_broken_pkg", "raise ImportError('no module selective_scan_cuda')\n")
    monkeypatch.setitem(dispatch.FAST_PATHS, "scan", ("mamba_ssm", "sambay_broken_pkg", ("sambay_broken_pkg",)))
    with pytest.warns(RuntimeWarning, match=r"sambay_broken_pkg is installed but failed to import "
                                            r"\(ImportError: no module selective_scan_cuda\)"):
        assert "failed to import" in dispatch.probe("scan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is a cached lookup
        assert dispatch.use_fast("scan", "auto", (torch.zeros(1),)) is False
        assert dispatch.probe("scan") is not None
    monkeypatch.setattr(dispatch, "on_cuda", lambda *t: True)
    with pytest.raises(RuntimeError, match="backend='cuda' needs mamba_ssm for the scan ops: sambay_broken_pkg is "
                                           "installed but failed to import"):
        dispatch.use_fast("scan", "cuda", (torch.zeros(1),))


def test_missing_package_is_silent(monkeypatch, fresh_probes):
    monkeypatch.setitem(dispatch.FAST_PATHS, "conv", ("causal_conv1d", "sambay_no_such_pkg", ("sambay_no_such_pkg",)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.probe("conv") == "sambay_no_such_pkg is not importable (not installed)"
    monkeypatch.setattr(dispatch, "on_cuda", lambda *t: True)
    assert dispatch.use_fast("conv", "auto", (torch.zeros(1),)) is False
    with pytest.raises(RuntimeError, match="not installed.*sambay\\[cuda\\]"):
        dispatch.use_fast("conv", "cuda", (torch.zeros(1),))


def test_cuda_backend_names_what_the_call_lacks(monkeypatch):
    monkeypatch.setattr(dispatch, "on_cuda", lambda *t: True)
    monkeypatch.setattr(dispatch, "_PROBES", {"attention": None})
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="flash_attn cannot take this attention call: dtypes torch.float32"):
        kernels.attend(q, q, q, None, True, 0.3, flash=(True, None), backend="cuda")
    with pytest.raises(RuntimeError, match="not flash-attn's causal/window"):
        kernels.attend(q.bfloat16(), q.bfloat16(), q.bfloat16(), None, True, 0.3, flash=None, backend="cuda")


def test_cpu_dispatch_calls_no_probe(monkeypatch):
    """CPU tensors are decided before any probe or import (what makes dispatch compile-safe)."""
    def boom(family):
        raise AssertionError(f"probe({family!r}) called for CPU tensors")
    monkeypatch.setattr(dispatch, "probe", boom)
    for fn, args in _op_calls().values():
        fn(*args)  # "auto"
        fn(*args, backend="torch")


def test_active_backends(monkeypatch):
    families = ("conv", "scan", "attention", "gating", "diff_decode")
    # the CPU fast paths: sambay's compiled linear and decode-attention kernels (built here by the probe)
    cpu_fast = {"linear": "sambay_cpu", "diff_decode": "sambay_cpu"}
    assert kernels.active_backends("cpu") == {f: "torch" for f in families} | cpu_fast
    monkeypatch.setattr(dispatch, "_PROBES", {"conv": None, "scan": None, "attention": "flash_attn is not importable",
                                              "gating": None, "diff_decode": None})
    assert kernels.active_backends("cuda:1") == {"conv": "causal_conv1d", "scan": "mamba_ssm", "attention": "torch",
                                                 "gating": "triton", "diff_decode": "triton", "linear": "torch"}


def test_backends_vocabulary_and_set_backend():
    from helpers import random_model

    assert kernels.BACKENDS == ("auto", "torch", "cuda")
    model = random_model()
    model.set_backend("cuda")  # accepted; CPU ops would then raise, saying why
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"cuda"}
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"one of \('auto', 'torch', 'cuda'\); got 'triton'"):
        model.set_backend("triton")


def _op_calls():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    u = r(2, 3, 14)
    q, k, v = r(1, 4, 3, 8), r(1, 2, 2, 3, 8), r(1, 2, 3, 16)
    return {
        "silu_mul": (kernels.silu_mul, (u[..., :7], u[..., 7:])),
        "gmu": (kernels.gmu, (r(2, 3, 5), r(6, 5), r(2, 3, 6))),
        "causal_conv1d": (kernels.causal_conv1d, (r(2, 6, 3 + 5), r(6, 4), r(6))),
        "causal_conv1d_step": (kernels.causal_conv1d_step, (r(2, 6, 3), r(2, 6), r(6, 4), r(6))),
        "selective_scan": (kernels.selective_scan, (r(2, 5, 6), r(2, 5, 6), -r(6, 3).exp(), r(2, 5, 3), r(2, 5, 3),
                                                    r(6), r(2, 5, 6), r(6))),
        "selective_step": (kernels.selective_step, (r(2, 6, 3), r(2, 6), r(2, 6), -r(6, 3).exp(), r(2, 3), r(2, 3),
                                                    r(6), r(2, 6), r(6))),
        "attend": (kernels.attend, (q, k[:, 0], v, None, True, 0.3, 0.0, (True, None))),
        "attend_pair": (kernels.attend_pair, (q, q, k, v, None, True, 0.3, 0.0, (True, None))),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_op_calls()))
def test_public_ops_compile_without_graph_breaks_on_cpu(name):
    """torch._dynamo.explain over each public op with CPU tensors: one graph, no break from dispatch."""
    torch._dynamo.reset()
    fn, args = _op_calls()[name]
    explanation = torch._dynamo.explain(lambda *a: fn(*a))(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_cached_probes_are_plain_values_under_compile(monkeypatch):
    """For CUDA tensors (the device hook stands in for them) a compiled region only reads the probe cache: no
    graph break once the probes ran; a probe first reached inside a compiled region says what to call first."""
    monkeypatch.setattr(dispatch, "on_cuda", lambda *t: True)
    fn, args = _op_calls()["selective_scan"]
    monkeypatch.setattr(dispatch, "_PROBES", {})
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"active_backends\(device\) before compiling"):
        torch.compile(lambda *a: fn(*a), fullgraph=True)(*args)
    monkeypatch.setattr(dispatch, "_PROBES", {"scan": "mamba_ssm is not importable (not installed)"})
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda *a: fn(*a))(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_static_decode_step_has_no_graph_break_on_cpu():
    """The model's static decode step (tiny8) traces as one graph on CPU: dispatch adds no break (issue 12 counted
    15-19, all from the availability probes' imports)."""
    from helpers import fixture_model

    from sambay.generation import decode_one_token

    model = fixture_model("tiny8").eval()
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    cache = model.allocate_cache(1, 20)
    torch._dynamo.reset()
    with torch.no_grad():
        model(ids, cache=cache)
        explanation = torch._dynamo.explain(lambda t, c: decode_one_token(model, t, c, static=True))(ids[:, -1], cache)
    assert explanation.graph_break_count == 0, explanation.break_reasons
