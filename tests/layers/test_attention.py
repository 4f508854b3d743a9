import pytest
import torch
from helpers import assert_close, randomize

from sambay.layers import Attention, CrossAttention, to_reference_layout
from sambay.masks import prefix_plan, sliding_plan


def _init(module, seed):
    return randomize(module, seed, vector_std=0.1, dtype=torch.float64)


def _naive_diff_attention(q, k, v, core, visible):
    """ARCHITECTURE.md 4.8 with explicit head indices. q: (B, T, Hq, D); k, v: (B, Hkv, S, D) in checkpoint
    head order; visible: (B, T, S) bool. Returns (B, T, Hq*D)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = (Hq // 2) // (Hkv // 2)
    lam = (torch.exp((core.lambda_q1 * core.lambda_k1).sum()) - torch.exp((core.lambda_q2 * core.lambda_k2).sum())
           + core.lambda_init)
    out = torch.zeros(B, T, Hq * D, dtype=q.dtype)
    for j in range(Hq // 2):
        g = j // group
        maps = []
        for s in (0, 1):
            scores = torch.einsum("btd,bsd->bts", q[:, :, 2 * j + s], k[:, 2 * g + s]) / D ** 0.5
            maps.append(scores.masked_fill(~visible, float("-inf")).softmax(-1))
        v12 = torch.cat([v[:, 2 * g], v[:, 2 * g + 1]], dim=-1)  # (B, S, 2D)
        o = torch.einsum("bts,bse->bte", maps[0], v12) - lam * torch.einsum("bts,bse->bte", maps[1], v12)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * core.subln.weight
        out[:, :, 2 * j * D:(2 * j + 2) * D] = o * (1 - core.lambda_init)
    return out


@pytest.mark.parametrize("T, window, heads, kv_heads", [
    pytest.param(9, None, 4, 2, id="full-T9-H4-KV2"),
    pytest.param(13, 4, 8, 4, id="sliding-T13-W4-H8-KV4"),
    pytest.param(40, 6, 8, 2, id="sliding-blocked-T40-W6-H8-KV2"),
    pytest.param(7, 16, 4, 4, id="window-wider-than-T"),
])
def test_self_attention_matches_naive(T, window, heads, kv_heads):
    D, C, B = 4, 24, 2
    attn = _init(Attention(C, heads, kv_heads, D, lambda_init=0.4), seed=T)
    x = torch.randn(B, T, C, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False  # left padding on row 1
    with torch.no_grad():
        q, k, v = attn.project(x)
        if window is None:
            plan = prefix_plan(0, T, T, valid, B, x.device)
        else:
            plan = sliding_plan(0, T, window, None, valid, B, x.device)
        out = attn.inner_cross_attn(q, k, v, plan, valid)
        k_ref, v_ref = to_reference_layout(k, v)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        vis = (j <= i) & ((j > i - window) if window else True)
        vis = vis[None] & valid[:, None, :]
        ref = _naive_diff_attention(q, k_ref, v_ref, attn.inner_cross_attn, vis)
    assert len(plan) > 1 or T <= 2 * (window or T)
    assert_close("attention", out[valid], ref[valid], 1e-10)
    assert (out[~valid] == 0).all()


def test_reference_layout_matches_checkpoint_head_order():
    attn = _init(Attention(16, 4, 4, 4, lambda_init=0.3), seed=0)
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    _, k, v = attn.project(x)
    k_ref, v_ref = to_reference_layout(k, v)
    flat = x @ attn.Wqkv.weight.T + attn.Wqkv.bias  # Q (16) | K (16) | V (16), head-major
    assert torch.equal(k_ref, flat[..., 16:32].view(1, 3, 4, 4).transpose(1, 2))
    assert torch.equal(v_ref, flat[..., 32:].view(1, 3, 4, 4).transpose(1, 2))


def test_cross_attention_reads_the_given_kv():
    D, C, B, T = 4, 16, 2, 6
    producer = _init(Attention(C, 4, 2, D, lambda_init=0.5), seed=1)
    cross = _init(CrossAttention(C, 4, D, lambda_init=0.7), seed=2)
    x, y = torch.randn(B, T, C, dtype=torch.float64), torch.randn(B, T, C, dtype=torch.float64)
    with torch.no_grad():
        _, k, v = producer.project(x)
        out = cross(y, k, v, prefix_plan(0, T, T, None, B, x.device))
        q = (y @ cross.Wqkv.weight.T + cross.Wqkv.bias).view(B, T, 4, D)
        vis = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, -1, -1)
        ref = _naive_diff_attention(q, *to_reference_layout(k, v), cross.inner_cross_attn, vis)
        ref = ref @ cross.out_proj.weight.T + cross.out_proj.bias
    assert_close("cross", out, ref, 1e-10)
