"""The conv's twin (one grouped F.conv1d) equals its spec."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from sambay.kernels.conv import ref as reference
from sambay.kernels.conv import twin as twins


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_twins_equal_reference(dtype):
    g = _gen(6)
    h = torch.randn(2, 5, 3 + 9, generator=g).to(dtype)
    w, b = torch.randn(5, 4, generator=g).to(dtype), torch.randn(5, generator=g).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(twins.causal_conv1d(h, w, b), reference.causal_conv1d_ref(h, w, b)) <= tol
    state, x = torch.randn(2, 5, 3, generator=g).to(dtype), torch.randn(2, 5, generator=g).to(dtype)
    s_ref = state.clone()
    out, ref = twins.causal_conv1d_step(state, x, w, None), reference.causal_conv1d_step_ref(s_ref, x, w, None)
    assert rel_err(out, ref) <= tol and torch.equal(state, s_ref)
