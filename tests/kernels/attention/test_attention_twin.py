"""Attention's CPU-tuned twin (matmul decode rows, padded SDPA) equals its spec."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from sambay.kernels.attention import ref as reference
from sambay.kernels.attention import twin as twins


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("tq, tk, masked, causal", [(1, 37, False, False), (3, 20, True, False), (6, 6, False, True),
                                                    (40, 40, False, True), (24, 50, True, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_twins_equal_reference(tq, tk, masked, causal, dtype):
    """Few rows: the matmul path; more than 16: padded SDPA. Both maps of a pair too."""
    g = _gen(tq * tk)
    q1, q2 = torch.randn(2, 4, tq, 8, generator=g).to(dtype), torch.randn(2, 4, tq, 8, generator=g).to(dtype)
    k, v = torch.randn(2, 2, 2, tk, 8, generator=g).to(dtype), torch.randn(2, 2, tk, 16, generator=g).to(dtype)
    mask = (torch.rand(2, 1, tq, tk, generator=g) > 0.3) | (torch.arange(tk) == 0) if masked else None
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    out = twins.attend(q1, k[:, 0], v, mask, causal, 0.3)
    assert out.dtype == dtype and rel_err(out, reference.attend_ref(q1, k[:, 0], v, mask, causal, 0.3)) <= tol
    pair, ref_pair = twins.attend_pair(q1, q2, k, v, mask, causal, 0.3), reference.attend_pair_ref(q1, q2, k, v,
                                                                                                   mask, causal, 0.3)
    assert all(rel_err(o, r) <= tol for o, r in zip(pair, ref_pair))
