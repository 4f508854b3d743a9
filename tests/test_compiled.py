"""The static decode step compiled (fullgraph, one compilation for every position and cache of a shape) and
exported (cache tensors as mutated inputs), each equal to the eager decode."""

import pytest
import torch
from helpers import random_model
from torch._dynamo.utils import counters

from sambay.cache import CacheError
from sambay.compiled import decode_step, export_decode_step


@pytest.fixture()
def model():
    torch._dynamo.reset()
    counters.clear()
    return random_model(sliding_window=5)


def _eager_decode(model, ids, prompt):
    cache = model.allocate_cache(ids.shape[0], ids.shape[1])
    out = [model(ids[:, :prompt], cache=cache, logits_to_keep=1).logits[:, -1]]
    out += [model(ids[:, t:t + 1], cache=cache).logits[:, -1] for t in range(prompt, ids.shape[1] - 1)]
    return torch.stack(out, 1)


@torch.no_grad()
def _compiled_decode(step, model, ids, prompt, length):
    cache = model.allocate_cache(ids.shape[0], length)
    out = [model(ids[:, :prompt], cache=cache, logits_to_keep=1).logits[:, -1]]  # the prefill stays eager
    out += [step(ids[:, t], cache) for t in range(prompt, ids.shape[1] - 1)]
    return torch.stack(out, 1), cache


@pytest.mark.slow
@torch.no_grad()
def test_compiled_step_compiles_once_across_positions_and_caches(model):
    """20 positions crossing the window wrap (W = 5), then a second cache of the same shape: one graph, no
    recompilation, no graph break (fullgraph=True raises on one)."""
    ids = torch.randint(0, 64, (2, 24))
    step = decode_step(model, backend="aot_eager", report=False)
    ref = _eager_decode(model, ids, 3)
    for _ in range(2):
        out, cache = _compiled_decode(step, model, ids, 3, 24)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert cache.length == 23 and int(cache.pos) == 23
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
@torch.no_grad()
def test_compiled_step_keeps_left_padding(model):
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    step = decode_step(model, backend="aot_eager", report=False)
    eager, compiled = model.allocate_cache(2, 12), model.allocate_cache(2, 12)
    a = [model(ids[:, :4], mask[:, :4], cache=c, logits_to_keep=1).logits[:, -1] for c in (eager, compiled)]
    torch.testing.assert_close(a[0], a[1])
    for t in range(4, 11):
        e = model(ids[:, t:t + 1], cache=eager).logits[:, -1]
        torch.testing.assert_close(step(ids[:, t], compiled), e, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_exported_step_equals_eager_over_several_steps(model):
    ids = torch.randint(0, 64, (1, 16))
    ref = _eager_decode(model, ids, 4)
    cache = model.allocate_cache(1, 16)
    out = [model(ids[:, :4], cache=cache, logits_to_keep=1).logits[:, -1]]
    before = [t.clone() for t in cache.tensors()]
    program = export_decode_step(model, cache)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.tensors())), "export must not advance the cache"
    step = program.module()
    out += [step(ids[:, t], *cache.tensors()) for t in range(4, 15)]
    torch.testing.assert_close(torch.stack(out, 1), ref, rtol=1e-4, atol=1e-5)
    cache.resync()  # the program advanced cache.pos, not the Python mirror
    assert cache.length == 15


@pytest.mark.slow
@torch.no_grad()
def test_the_model_exports_with_its_output_dataclass(model):
    ids = torch.randint(0, 64, (1, 7))
    program = torch.export.export(model, (ids,))
    out = program.module()(ids)
    assert type(out).__name__ == "CausalLMOutput"
    torch.testing.assert_close(out.logits, model(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@torch.no_grad()
def test_inductor_compiled_step_equals_eager(model):
    """The real code generation (C++ on CPU): minutes on a 2-core machine."""
    ids = torch.randint(0, 64, (1, 10))
    step = decode_step(model, report=False)
    out, _ = _compiled_decode(step, model, ids, 3, 10)
    torch.testing.assert_close(out, _eager_decode(model, ids, 3), rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(ids[:, :3], max_new_tokens=6, compile=True),
                       model.generate(ids[:, :3], max_new_tokens=6))


@pytest.mark.slow
@torch.no_grad()
def test_generate_compiled_equals_generate(model):
    """generate(compile=...) (the prefill eager, the static step compiled) gives generate()'s tokens, greedy and
    with left padding; a second call of the same shape does not recompile."""
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=9)
    for _ in range(2):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=9, compile="aot_eager")
        assert torch.equal(out, ref)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.slow
@torch.no_grad()
def test_the_compiled_step_past_the_end_of_the_cache_names_it(model):
    """The compiled step checks the capacity before each call, in Python, without a sync (the CPU position is
    read directly): the step that would write position max_length is a CacheError, not an IndexError from
    index_copy_."""
    step = decode_step(model, backend="aot_eager", report=False)
    cache = model.allocate_cache(1, 5)
    model(torch.randint(0, 64, (1, 3)), cache=cache)
    token = torch.tensor([7])
    for _ in range(2):
        step(token, cache)
    with pytest.raises(CacheError, match=r"cache overflow: the static decode step would write position 5, past the "
                                         r"end of the SambaYCache \(max_length=5"):
        step(token, cache)
    assert cache.length == 5
    with pytest.raises(CacheError, match=r"cache: this generate call writes 7 positions \(a prompt of 3 and "
                                         r"max_new_tokens=5, the last token not fed back\), but the SambaYCache passed "
                                         r"holds max_length=5; allocate one with allocate_cache\(1, 7\)"):
        model.generate(torch.randint(0, 64, (1, 3)), max_new_tokens=5, cache=cache, compile="aot_eager")
