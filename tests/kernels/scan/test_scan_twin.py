"""The scan's CPU-tuned twin (blocked, in place) equals its spec."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from sambay.kernels.scan import ref as reference
from sambay.kernels.scan import twin as twins


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _scan_args(Bsz, T, E, N, dtype, seed=0, bias=True):
    g = _gen(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x, dt = r(Bsz, T, E).to(dtype), (r(Bsz, T, E) - 1).to(dtype)
    A = -torch.exp(r(E, N) * 0.5)
    dt_bias = r(E) * 0.5 if bias else None
    return x, dt, A, r(Bsz, T, N).to(dtype), r(Bsz, T, N).to(dtype), r(E), r(Bsz, T, E).to(dtype), dt_bias


@pytest.mark.parametrize("T", [1, 5, 64, 130])  # the twin works in blocks of 64 steps
@pytest.mark.parametrize("gated, with_s0, bias", [(True, False, True), (False, True, True), (True, True, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selective_scan_twin_equals_reference(T, gated, with_s0, bias, dtype):
    x, dt, A, B, C, D, z, dt_bias = _scan_args(2, T, 6, 4, dtype, seed=T, bias=bias)
    s0 = torch.randn(2, 6, 4, generator=_gen(9), dtype=torch.float32).to(dtype if dtype == torch.float64 else
                                                                        torch.float32) if with_s0 else None
    z = z if gated else None
    out, last = twins.selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, s0=s0)
    ref, ref_last = reference.selective_scan_ref(x, dt, A, B, C, D, z=z, dt_bias=dt_bias, s0=s0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == ref.dtype == dtype and rel_err(out, ref) <= tol and rel_err(last, ref_last) <= tol


def test_selective_scan_twin_with_autograd_equals_reference():
    x, dt, A, B, C, D, z, dt_bias = _scan_args(2, 70, 5, 3, torch.float64, seed=3)
    x.requires_grad_(True)
    out, _ = twins.selective_scan(x, dt, A, B, C, D, z=z, dt_bias=dt_bias)
    ref, _ = reference.selective_scan_ref(x, dt, A, B, C, D, z=z, dt_bias=dt_bias)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert rel_err(out, ref) <= 1e-12 and rel_err(g, g_ref) <= 1e-12


@pytest.mark.parametrize("gated, bias", [(True, True), (False, False)])
def test_selective_step_twin_equals_reference(gated, bias):
    x, dt, A, B, C, D, z, dt_bias = _scan_args(3, 1, 6, 4, torch.float32, seed=4, bias=bias)
    state = torch.randn(3, 6, 4, generator=_gen(5))
    s_ref = state.clone()
    z = z[:, 0] if gated else None
    out = twins.selective_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z=z, dt_bias=dt_bias)
    ref = reference.selective_step_ref(s_ref, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z=z, dt_bias=dt_bias)
    assert rel_err(out, ref) <= 1e-6 and rel_err(state, s_ref) <= 1e-6
