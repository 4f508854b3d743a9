"""Decode == full forward: the cache, chunked prefill, the YOCO skip and generate()."""

import pytest
import torch
from helpers import assert_close, fixture_model, load_fixture, random_model

FP32 = 1e-4


def _full_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def _decode_logits(model, ids, prompt_len, mask=None, chunk=1):
    """Prefill ids[:, :prompt_len], then feed the rest ``chunk`` tokens at a time; all logits."""
    B, T = ids.shape
    cache = model.allocate_cache(B, T)
    out = []
    with torch.no_grad():
        for start, end in [(0, prompt_len)] + [(s, min(T, s + chunk)) for s in range(prompt_len, T, chunk)]:
            m = None if mask is None else mask[:, :end]
            out.append(model(ids[:, start:end], attention_mask=m, cache=cache).logits)
    assert cache.length == T
    return torch.cat(out, dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny8", "small16"])
def test_teacher_forced_decode_matches_fixture_and_full_forward(name):
    _, inp, exp, dec = load_fixture(name)
    model = fixture_model(name)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    P = int(dec["prompt_len"][0])
    assert torch.equal(dec["step_input_ids"], ids[:, P:])
    logits = _decode_logits(model, ids, P, mask)
    real = mask.bool()
    assert_close("prefill", logits[:, :P][real[:, :P]], dec["prefill_logits"][real[:, :P]], FP32)
    assert_close("steps vs step_logits_clean", logits[:, P:], dec["step_logits_clean"], FP32)
    assert_close("steps vs expected", logits[:, P:], exp["logits"][:, P:], FP32)


@pytest.mark.parametrize("name", ["tiny8", "small16"])
def test_greedy_generation_matches_fixture(name):
    _, _, _, dec = load_fixture(name)
    model = fixture_model(name)
    out = model.generate(dec["greedy_prompt_ids"], attention_mask=dec["greedy_prompt_mask"], max_new_tokens=16)
    assert torch.equal(out[:, :20 if name == "small16" else 12], dec["greedy_prompt_ids"])
    assert torch.equal(out[:, dec["greedy_prompt_ids"].shape[1]:], dec["greedy_ids_clean"])


def test_fixture_sees_the_difference_between_clean_and_buggy_decode():
    """The clean and HF-copy decode logits differ, so matching step_logits_clean means something."""
    _, _, _, dec = load_fixture("small16")
    assert (dec["step_logits_clean"] - dec["step_logits_copy_asis"]).abs().max() > 0.1


@pytest.mark.parametrize("prompt_len, total, window", [
    pytest.param(3, 40, 5, id="short-prompt-many-wraps"),
    pytest.param(5, 23, 5, id="prompt-exactly-window"),
    pytest.param(1, 30, 7, id="single-token-prompt"),
    pytest.param(12, 30, 4, id="prompt-longer-than-window"),
    pytest.param(4, 26, 6, id="prompt-one-below-window"),
])
@pytest.mark.slow
def test_decode_matches_full_forward_across_window_wraps(prompt_len, total, window):
    model = random_model(seed=1, sliding_window=window)
    ids = torch.randint(0, model.config.vocab_size, (2, total))
    assert_close("decode", _decode_logits(model, ids, prompt_len), _full_logits(model, ids), FP32)


@pytest.mark.parametrize("layers, heads, kv_heads, window, hidden", [
    pytest.param(4, 2, 2, 3, 16, id="L4-H2-KV2-W3"),
    pytest.param(8, 8, 2, 4, 32, id="L8-H8-KV2-W4"),
    pytest.param(12, 4, 4, 6, 24, id="L12-H4-KV4-W6"),
    pytest.param(8, 6, 2, 9, 36, id="L8-H6-KV2-W9"),
    pytest.param(16, 4, 2, 1, 32, id="L16-H4-KV2-W1"),
])
def test_decode_matches_full_forward_on_random_configs(layers, heads, kv_heads, window, hidden):
    model = random_model(seed=layers + heads, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, sliding_window=window, hidden_size=hidden)
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * window + 7))
    assert_close("decode", _decode_logits(model, ids, 2), _full_logits(model, ids), FP32)


@pytest.mark.parametrize("chunk", [2, 3, 5, 11])
def test_chunked_prefill_equals_one_shot(chunk):
    model = random_model(seed=2, sliding_window=5)
    ids = torch.randint(0, model.config.vocab_size, (2, 29))
    assert_close(f"chunk={chunk}", _decode_logits(model, ids, 4, chunk=chunk), _full_logits(model, ids), FP32)


def test_chunked_prefill_with_left_padding():
    model = random_model(seed=3, sliding_window=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    full = _full_logits(model, ids, mask)
    for chunk in (1, 4):
        got = _decode_logits(model, ids, 3, mask, chunk=chunk)
        assert_close(f"padded chunk={chunk}", got[mask.bool()], full[mask.bool()], FP32)


def test_long_prompt_blocked_sliding_attention_equals_decode():
    """Prompts longer than 2 windows take the blocked sliding path; decoding token by token does not."""
    model = random_model(seed=4, sliding_window=4)
    ids = torch.randint(0, model.config.vocab_size, (1, 23))
    assert_close("blocked", _full_logits(model, ids), _decode_logits(model, ids, 1), FP32)


def test_logits_to_keep_with_cache_equals_full_forward():
    model = random_model(seed=5)
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    full = _full_logits(model, ids)
    cache = model.allocate_cache(2, 17)
    with torch.no_grad():
        a = model(ids[:, :10], cache=cache, logits_to_keep=1).logits
        b = model(ids[:, 10:], cache=cache, logits_to_keep=3).logits
    assert_close("prefill keep 1", a[:, 0], full[:, 9], FP32)
    assert_close("chunk keep 3", b, full[:, 14:], FP32)


def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = random_model(seed=6, sliding_window=4)
    a = torch.randint(3, model.config.vocab_size, (1, 9))
    b = torch.randint(3, model.config.vocab_size, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(out[0, 9:], model.generate(a, max_new_tokens=12)[0, 9:])
    assert torch.equal(out[1, 9:], model.generate(b, max_new_tokens=12)[0, 5:])


def test_eos_stops_rows_and_pads_them():
    model = random_model(seed=7)
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    free = model.generate(ids, max_new_tokens=10)
    eos = int(free[0, 8])  # a token row 0 produces at its third step
    out = model.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 6:]
    first = int((row0 == eos).nonzero()[0])
    assert torch.equal(row0[: first + 1], free[0, 6:6 + first + 1])
    assert (row0[first + 1:] == 0).all()
    row1 = out[1, 6:]
    hits = (free[1, 6:] == eos).nonzero()
    stop = int(hits[0]) if len(hits) else None
    assert torch.equal(row1[: (stop + 1) if stop is not None else None], free[1, 6:][: (stop + 1) if stop is not None
                                                                                       else out.shape[1] - 6])


def test_generation_stops_early_when_every_row_finished():
    model = random_model(seed=8)
    ids = torch.randint(3, model.config.vocab_size, (1, 4))
    first = int(model.generate(ids, max_new_tokens=1)[0, -1])
    out = model.generate(ids, max_new_tokens=50, eos_token_id=first)
    assert out.shape == (1, 5)


def test_sampling_is_reproducible_and_respects_top_k():
    model = random_model(seed=9)
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
    a = model.generate(ids, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(ids, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    one = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(one, model.generate(ids, max_new_tokens=8))  # top_k=1 sampling is greedy


def test_streamer_receives_each_new_token():
    model = random_model(seed=10)
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    seen = []
    out = model.generate(ids, max_new_tokens=6, streamer=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 5:])

    class Streamer:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t)

        def end(self):
            self.ended = True

    s = Streamer()
    model.generate(ids[:1], max_new_tokens=3, streamer=s)
    assert s.ended and len(s.puts) == 4 and torch.equal(s.puts[0], ids[:1])  # the prompt first, as HF does


@pytest.mark.slow
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_static_decode_step_equals_dynamic_decode(padded):
    """The shape-static step (position from cache.pos, attention over all slots) == the dynamic step."""
    from sambay.generation import decode_one_token

    model = random_model(seed=11, sliding_window=4)
    ids = torch.randint(3, model.config.vocab_size, (2, 20))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    P = 5
    caches = [model.allocate_cache(2, 24) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :P], attention_mask=mask[:, :P], cache=cache)
        for t in range(P, 20):
            dyn = decode_one_token(model, ids[:, t], caches[0])
            sta = decode_one_token(model, ids[:, t], caches[1], static=True)
            assert caches[1].pos.item() == caches[1].length == t + 1
            assert_close(f"static step {t}", sta, dyn, 1e-5)
    full = _full_logits(model, ids, mask)
    assert_close("static vs full forward", sta[mask[:, -1].bool()], full[:, -1][mask[:, -1].bool()], FP32)


def test_static_step_shapes_do_not_depend_on_the_position():
    """What graph capture needs: the K/V and masks every attention core receives have the same shapes at every
    position in the static step (the dynamic step's grow with the position, which the last check confirms)."""
    from sambay.layers import DiffAttentionCore

    def record(static):
        model = random_model(seed=12, sliding_window=3)
        cache = model.allocate_cache(1, 16)
        steps = []

        def hook(mod, args):
            q, k, v, plan = args[:4]
            steps[-1].append((tuple(k.shape), tuple(v.shape), [tuple(c.mask.shape) if c.mask is not None else None
                                                               for c in plan]))

        with torch.no_grad():
            model(torch.randint(0, 64, (1, 2)), cache=cache)
            hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, DiffAttentionCore)]
            for _ in range(2, 12):
                steps.append([])
                model(torch.randint(0, 64, (1, 1)), cache=cache, static=static)
        for h in hooks:
            h.remove()
        return steps

    static = record(True)
    assert len(static[0]) > 0 and all(s == static[0] for s in static)
    dynamic = record(False)
    assert any(s != dynamic[0] for s in dynamic)
    model = random_model(seed=12, sliding_window=3)
    with pytest.raises(ValueError, match="static=True is the one-token decode step"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=model.allocate_cache(1, 4), static=True)
