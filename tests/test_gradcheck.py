"""torch.autograd.gradcheck in float64 for every layer type and for the whole model.

Each check differentiates with respect to the layer's inputs *and* all of its parameters (through
torch.func.functional_call), so a wrong backward anywhere (custom ops, in-place writes in the scan,
masks, the lambda re-parametrisation, fp32-only parameters) shows up as a Jacobian mismatch.
Sizes are tiny: the numerical Jacobian costs two forwards per input element.
"""

from __future__ import annotations

import pytest
import torch
from helpers import MICRO, random_config, randomize
from torch.autograd import gradcheck
from torch.autograd.gradcheck import GradcheckError
from torch.func import functional_call

from sambay import SambaYConfig, SambaYForCausalLM
from sambay.layers import GMU, MLP, Attention, CrossAttention, Mamba
from sambay.masks import prefix_plan, sliding_plan

F64 = torch.float64
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine the OpenMP spin-waits
    make each of gradcheck's hundreds of forwards 10x slower."""


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """float64, with O(1) weights so that no path is numerically negligible."""
    return randomize(module, seed, vector_std=0.3, dtype=F64, mamba_ranges=True)


def _check(module: torch.nn.Module, fn, *inputs: torch.Tensor, fast: bool = False, only=None) -> None:
    """gradcheck of fn(module, *inputs) w.r.t. the inputs and every parameter of ``module`` (or those
    whose name is in ``only``)."""
    names, params = zip(*[(n, p.detach().clone().requires_grad_()) for n, p in module.named_parameters()
                          if only is None or n in only])
    inputs = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs)

    def f(*args):
        xs, ps = args[:len(inputs)], args[len(inputs):]
        out = fn(_Bound(module, dict(zip(names, ps))), *xs)
        return tuple(o for o in out if o is not None) if isinstance(out, tuple) else out  # Mamba: memory or None

    assert gradcheck(f, inputs + params, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)


class _Bound:
    """Calls module methods with the given parameter tensors substituted (functional_call per method)."""

    def __init__(self, module, params):
        self.module, self.params = module, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.module, self.params, args, kwargs)

    def method(self, name, *args):
        return functional_call(_MethodAsForward(self.module, name), {f"m.{k}": v for k, v in self.params.items()},
                               args)


class _MethodAsForward(torch.nn.Module):
    def __init__(self, module, name):
        super().__init__()
        self.m, self.name = module, name

    def forward(self, *args):
        return getattr(self.m, self.name)(*args)


def _padding(B: int, T: int, pad: int) -> torch.Tensor | None:
    if pad == 0:
        return None
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[-1, :pad] = False  # left padding on the last row
    return valid


@pytest.mark.slow
@pytest.mark.parametrize("pad", [pytest.param(0, id="unpadded"), pytest.param(2, id="left-padded")])
@pytest.mark.parametrize("memory_producer", [pytest.param(False, id="gated"), pytest.param(True, id="memory")])
def test_mamba_gradcheck(memory_producer, pad):
    B, T, C, E = 2, 5, 3, 4
    layer = _randomize(Mamba(C, E, d_state=2, d_conv=3, dt_rank=2, memory_producer=memory_producer), seed=1)
    mask = _padding(B, T, pad)
    _check(layer, lambda m, x: m(x, mask), torch.randn(B, T, C, dtype=F64))


def _self_attention(plan_fn, pad):
    B, T, C, H, Hkv, D = 2, 6, 4, 4, 2, 2
    layer = _randomize(Attention(C, H, Hkv, D, lambda_init=0.3), seed=2)
    valid = _padding(B, T, pad)
    plan = plan_fn(T, valid, B)

    def run(m, x):
        q, k, v = m.method("project", x)
        return m(q, k, v, plan, valid)

    _check(layer, run, torch.randn(B, T, C, dtype=F64))


@pytest.mark.slow
@pytest.mark.parametrize("pad", [pytest.param(0, id="unpadded"), pytest.param(2, id="left-padded")])
def test_sliding_attention_gradcheck(pad):
    # window 2 < T/2: the plan is several masked SDPA blocks
    plan_fn = lambda T, valid, B: sliding_plan(0, T, 2, None, valid, B, CPU)
    assert len(plan_fn(6, None, 2)) > 1
    _self_attention(plan_fn, pad)


@pytest.mark.slow
@pytest.mark.parametrize("pad", [pytest.param(0, id="unpadded"), pytest.param(2, id="left-padded")])
def test_full_attention_gradcheck(pad):
    _self_attention(lambda T, valid, B: prefix_plan(0, T, T, valid, B, CPU), pad)


@pytest.mark.slow
def test_cross_attention_gradcheck():
    """Own queries; the shared K/V are inputs too, so the gradient that flows back to the KV producer
    layer is checked."""
    B, T, C, H, Hkv, D = 2, 5, 4, 4, 2, 2
    layer = _randomize(CrossAttention(C, H, D, lambda_init=0.6), seed=3)
    k = torch.randn(B, 2, Hkv // 2, T, D, dtype=F64)
    v = torch.randn(B, Hkv // 2, T, 2 * D, dtype=F64)
    plan = prefix_plan(0, T, T, None, B, CPU)
    _check(layer, lambda m, x, k, v: m(x, k, v, plan), torch.randn(B, T, C, dtype=F64), k, v)


def test_gmu_gradcheck():
    B, T, C, E = 2, 3, 3, 4
    layer = _randomize(GMU(C, E), seed=4)
    _check(layer, lambda m, x, mem: m(x, mem), torch.randn(B, T, C, dtype=F64), torch.randn(B, T, E, dtype=F64))


def test_mlp_gradcheck():
    layer = _randomize(MLP(3, 4), seed=5)
    _check(layer, lambda m, x: m(x), torch.randn(2, 3, 3, dtype=F64))


def _tiny_config(**overrides) -> SambaYConfig:
    return random_config(**{**MICRO, **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("pad", [pytest.param(0, id="unpadded"), pytest.param(2, id="left-padded")])
def test_whole_model_gradcheck(pad):
    """All 8 layer roles (Mamba, sliding, memory Mamba, full, GMU, cross) and the tied head: logits are
    checked against every parameter (fast gradcheck: random projections of the full Jacobian)."""
    config = _tiny_config()
    assert set(config.layer_types) == {"mamba", "sliding_attention", "full_attention", "gmu", "cross_attention"}
    model = _randomize(SambaYForCausalLM(config), seed=6)
    B, T = 2, 6
    ids = torch.randint(0, config.vocab_size, (B, T))
    valid = _padding(B, T, pad)
    mask = None if valid is None else valid.long()
    _check(model, lambda m, ids: m(ids, attention_mask=mask).logits, ids, fast=True)


@pytest.mark.slow
def test_whole_model_gradcheck_detects_a_wrong_backward():
    """The harness can fail: parameters really are substituted, so a mixer whose backward is scaled
    by 2 (a wrong gradient for every parameter upstream of it) makes gradcheck raise."""

    class _Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    config = _tiny_config()
    model = _randomize(SambaYForCausalLM(config), seed=6)
    ids = torch.randint(0, config.vocab_size, (1, 4))
    only = {"model.embed_tokens.weight", "model.layers.0.attn.in_proj.weight"}
    _check(model, lambda m, ids: m(ids).logits, ids, fast=True, only=only)  # fine before the hook
    model.model.layers[0].attn.register_forward_hook(lambda mod, args, out: (_Wrong.apply(out[0]), *out[1:]))
    with pytest.raises(GradcheckError):
        _check(model, lambda m, ids: m(ids).logits, ids, fast=True, only=only)
