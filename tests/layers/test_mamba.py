import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, random_mamba

from sambay.cache import MambaState


def _mamba(memory_producer=False, seed=0, E=24, C=16):
    return random_mamba(C, E, 4, 3, memory_producer, seed, torch.float64)


def _state(m, B):
    return MambaState(torch.zeros(B, m.d_inner, m.d_conv - 1, dtype=torch.float64),
                      torch.zeros(B, m.d_inner, m.d_state, dtype=torch.float64))


def _naive(m, x):
    """Mamba-1 written out step by step from ARCHITECTURE.md 4.5, float64, independent of the module's code."""
    B, T, _ = x.shape
    xz = x @ m.in_proj.weight.T
    xs, z = xz[..., :m.d_inner], xz[..., m.d_inner:]
    w, cb = m.conv1d.weight[:, 0], m.conv1d.bias
    A = -torch.exp(m.A_log)
    s = torch.zeros(B, m.d_inner, m.d_state, dtype=x.dtype)
    ys = []
    for t in range(T):
        acc = cb.clone().expand(B, -1).clone()
        for k in range(m.d_conv):
            src = t - (m.d_conv - 1) + k
            if src >= 0:
                acc = acc + w[:, k] * xs[:, src]
        xc = F.silu(acc)
        proj = xc @ m.x_proj.weight.T
        dt_raw, b, c = proj[:, :m.dt_rank], proj[:, m.dt_rank:m.dt_rank + m.d_state], proj[:, m.dt_rank + m.d_state:]
        delta = F.softplus(dt_raw @ m.dt_proj.weight.T + m.dt_proj.bias)
        s = torch.exp(delta[..., None] * A) * s + delta[..., None] * b[:, None, :] * xc[..., None]
        ys.append((s * c[:, None, :]).sum(-1) + m.D * xc)
    y = torch.stack(ys, 1)
    return (y * F.silu(z)) @ m.out_proj.weight.T, y


@pytest.mark.parametrize("memory_producer", [False, True], ids=["gated", "memory-producer"])
def test_mamba_forward_matches_naive_recurrence(memory_producer):
    m = _mamba(memory_producer)
    x = torch.randn(2, 70, 16, dtype=torch.float64)  # > one scan block of 64 steps
    with torch.no_grad():
        out, mem = m(x)
        ref_out, ref_mem = _naive(m, x)
    assert_close("out", out, ref_out, 1e-10)
    if memory_producer:
        assert_close("memory", mem, ref_mem, 1e-10)
    else:
        assert mem is None


@pytest.mark.parametrize("memory_producer", [False, True], ids=["gated", "memory-producer"])
def test_mamba_step_matches_forward(memory_producer):
    m = _mamba(memory_producer, seed=1)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        out, mem = m(x)
        state = _state(m, 2)
        steps = [m.step(x[:, t:t + 1], state) for t in range(11)]
    assert_close("step out", torch.cat([s[0] for s in steps], 1), out, 1e-10)
    if memory_producer:
        assert_close("step memory", torch.cat([s[1] for s in steps], 1), mem, 1e-10)


@pytest.mark.parametrize("chunks", [[5, 6], [1, 2, 8], [3, 3, 3, 2]])
def test_mamba_chunked_forward_with_state_matches_one_shot(chunks):
    m = _mamba(seed=2)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        out, _ = m(x)
        state = _state(m, 2)
        parts, t = [], 0
        for n in chunks:
            parts.append(m(x[:, t:t + n], state=state, fresh=t == 0)[0])
            t += n
    assert_close("chunked", torch.cat(parts, 1), out, 1e-10)


def test_left_padding_leaves_the_state_untouched():
    m = _mamba(memory_producer=True, seed=3)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 4, 16, dtype=torch.float64), x], 1)
    mask = torch.tensor([[0] * 4 + [1] * 9])
    with torch.no_grad():
        alone, _ = m(x)
        out, mem = m(padded, mask=mask)
    assert_close("padded", out[:, 4:], alone, 1e-10)
    assert (mem[:, :4] == 0).all()
