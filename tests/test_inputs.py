"""Bad inputs to forward and to the cache: each gets a sambay error naming the argument, what was expected and
what was found, raised before any state is written; a call that fails midway leaves the cache refused."""

import pytest
import torch
from helpers import random_model

from sambay.cache import CacheError


@pytest.fixture(scope="module")
def model():
    return random_model()


def _ids(*shape):
    return torch.randint(0, 64, shape)


@pytest.mark.parametrize("ids, words", [
    pytest.param(torch.zeros(2, 3), "input_ids: expected an integer tensor", id="float"),
    pytest.param(torch.zeros(2, 3, dtype=torch.bool), "input_ids: expected an integer tensor", id="bool"),
    pytest.param(torch.zeros(6, dtype=torch.long), r"got a torch.int64 tensor of shape \(6,\)", id="1d"),
    pytest.param(torch.zeros(1, 2, 3, dtype=torch.long), "shape \\(batch, tokens >= 1\\)", id="3d"),
    pytest.param(torch.zeros(2, 0, dtype=torch.long), "tokens >= 1", id="empty"),
    pytest.param([[1, 2]], "got list", id="list"),
    pytest.param(torch.tensor([[1, 64]]), r"token ids in \[0, vocab_size=64\), got ids in \[1, 64\]", id="too-big"),
    pytest.param(torch.tensor([[-1, 3]]), r"got ids in \[-1, 3\]", id="negative"),
])
def test_bad_input_ids_are_named(model, ids, words):
    with pytest.raises(ValueError, match=words):
        model(ids)


@pytest.mark.parametrize("token", [64, -1, 10**6])
def test_an_out_of_range_decode_token_is_named(model, token):
    """Decode steps skip the (syncing) range check; the lookup's own error is re-raised naming the argument."""
    cache = model.allocate_cache(1, 4)
    with torch.no_grad():
        model(_ids(1, 2), cache=cache)
        words = rf"input_ids: expected token ids in \[0, vocab_size=64\), got \[\[{token}\]\]"
        with pytest.raises(ValueError, match=words):
            model(torch.tensor([[token]]), cache=cache)


def test_input_ids_and_embeds_are_exclusive(model):
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds, got both"):
        model.model(_ids(1, 3), inputs_embeds=torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="got neither"):
        model.model()
    with pytest.raises(ValueError, match=r"inputs_embeds: expected a float tensor \(B, T >= 1, 32\)"):
        model.model(inputs_embeds=torch.zeros(1, 3, 31))


def test_inputs_embeds_equal_input_ids(model):
    ids = _ids(2, 7)
    with torch.no_grad():
        a = model.model(ids)
        b = model.model(inputs_embeds=model.model.embed_tokens(ids))
    assert torch.equal(a, b)


def test_hidden_states_follow_the_hf_convention(model):
    ids = _ids(2, 7)
    with torch.no_grad():
        out, hidden = model.model(ids, output_hidden_states=True)
        kept, hidden_kept = model.model(ids, logits_to_keep=2, output_hidden_states=True)
    n = model.config.num_hidden_layers
    assert len(hidden) == n + 1 and torch.equal(hidden[-1], out) and torch.equal(out, model.model(ids))
    assert torch.equal(hidden[0], model.model.embed_tokens(ids).float())
    assert [h.shape[1] for h in hidden_kept] == [7] * (model.config.kv_layer + 1) + [2] * (n - model.config.kv_layer)
    torch.testing.assert_close(hidden_kept[-1], out[:, -2:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", [-1, 1.0, True, "2", None])
def test_bad_logits_to_keep(model, keep):
    with pytest.raises(ValueError, match="logits_to_keep: expected an int >= 0"):
        model(_ids(1, 3), logits_to_keep=keep)


def test_input_on_another_device_is_named(model):
    with pytest.raises(ValueError, match="input_ids: expected a tensor on the model's device cpu, got one on meta"):
        model(torch.zeros(1, 2, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("mask, words", [
    pytest.param(torch.tensor([[1, 1, 2]]), "expected only 0 .padding. and 1", id="value-2"),
    pytest.param(torch.tensor([[1.0, 0.5, 1.0]]), "expected only 0", id="fraction"),
    pytest.param(torch.tensor([[1, 0, 1]]), "one run of real tokens", id="hole"),
    pytest.param(torch.ones(1, 4), r"expected shape \(1, 3\) \(input_ids\), got \(1, 4\)", id="shape"),
    pytest.param([[1, 1, 1]], r"got list", id="list"),
])
def test_bad_masks_without_cache(model, mask, words):
    with pytest.raises(ValueError, match=words):
        model(_ids(1, 3), attention_mask=mask)


def test_right_padding_is_exact_without_a_cache(model):
    """Without a cache right padding is exact for the real tokens (every pad comes after them)."""
    ids = _ids(1, 5)
    padded = torch.cat([ids, _ids(1, 2)], dim=1)
    with torch.no_grad():
        ref = model(ids).logits
        out = model(padded, attention_mask=torch.tensor([[1] * 5 + [0] * 2])).logits[:, :5]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_right_padding_is_refused_with_a_cache(model):
    """A right-padded prompt would generate continuations of its pad tokens: refused, with the remedy."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left padding.*padding_side = 'left'"):
        model.generate(_ids(2, 4), attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="padding must be on the left"):  # a hole: caught by the model's check
        model.generate(_ids(2, 4), attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]), max_new_tokens=2)
    cache = model.allocate_cache(2, 8)
    with pytest.raises(ValueError, match="padding must be on the left"):
        model(_ids(2, 4), attention_mask=mask, cache=cache)
    assert cache.length == 0 and not cache.valid.any()  # refused before anything was written


def test_a_cache_for_another_config_is_refused(model):
    other = random_model(sliding_window=4)  # same tensor shapes except the ring
    same_shapes = random_model(sliding_window=5, layer_norm_eps=1e-6)
    for m in (other, same_shapes):
        with pytest.raises(CacheError, match="cache config mismatch"):
            model(_ids(1, 2), cache=m.allocate_cache(1, 8))


def test_overflow_is_detected_before_any_state_is_written(model):
    cache = model.allocate_cache(1, 4)
    with pytest.raises(CacheError, match="cache overflow: 0 tokens cached \\+ 5 new > max_length=4"):
        model(_ids(1, 5), cache=cache)
    assert cache.length == 0 and all(t.abs().sum() == 0 for s in cache.layers if s is not None
                                     for t in vars(s).values())


def test_a_failed_forward_leaves_the_cache_refused_until_reset(model):
    """An exception in layer 5 (e.g. out of memory) must not leave the Mamba states advanced and the length not."""
    ids = _ids(1, 6)
    with torch.no_grad():
        ref = model(ids).logits
        cache = model.allocate_cache(1, 8)
        model(ids[:, :4], cache=cache)

        def boom(*args):
            raise RuntimeError("simulated out of memory")

        handle = model.model.layers[5].register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="simulated"):
            model(ids[:, 4:5], cache=cache)
        handle.remove()
        with pytest.raises(CacheError, match="the cache is invalid .a forward call raised.*call cache.reset"):
            model(ids[:, 4:5], cache=cache)
        cache.reset()
        model(ids[:, :4], cache=cache)
        out = torch.cat([model(ids[:, 4:5], cache=cache).logits, model(ids[:, 5:6], cache=cache).logits], dim=1)
    torch.testing.assert_close(out, ref[:, 4:], rtol=1e-4, atol=1e-5)


def test_huge_caches_fail_up_front_with_the_bytes(model):
    with pytest.raises(MemoryError, match=r"cannot allocate [\d.]+ GiB \(\d+ bytes\) for batch_size=1, "
                                          r"max_length=1000000000000"):
        model.allocate_cache(1, 10**12)


@pytest.mark.parametrize("kw, words", [
    pytest.param({"batch_size": 0}, "batch_size to be an int >= 1, got 0", id="batch0"),
    pytest.param({"max_length": 2.5}, "max_length to be an int >= 1, got 2.5", id="float-length"),
    pytest.param({"dtype": torch.int64}, "expected a floating torch.dtype", id="int-dtype"),
])
def test_bad_cache_arguments(model, kw, words):
    args = {"batch_size": 1, "max_length": 4, **kw}
    with pytest.raises((ValueError, TypeError), match=words):
        model.allocate_cache(**args)


def test_seek_sets_the_length_and_validates(model):
    cache = model.allocate_cache(1, 8)
    cache.seek(5)
    assert cache.length == 5 and int(cache.pos) == 5 and cache.valid[0].tolist() == [True] * 5 + [False] * 3
    with pytest.raises(ValueError, match=r"cache.seek: expected an int in \[0, max_length=8\], got 9"):
        cache.seek(9)


def test_static_steps_keep_length_in_step_with_pos(model):
    """The static step counts on the device only; reading cache.length syncs the mirror once."""
    cache = model.allocate_cache(1, 8)
    with torch.no_grad():
        model(_ids(1, 3), cache=cache)
        for _ in range(2):
            model(_ids(1, 1), cache=cache, static=True)
    assert cache.length == 5 and int(cache.pos) == 5


@pytest.mark.parametrize("labels", [torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3),
                                    torch.zeros(3, dtype=torch.long)], ids=["shape", "float", "1d"])
def test_bad_labels_are_named(model, labels):
    with pytest.raises(ValueError, match=r"labels: expected an integer tensor of shape \(1, 3\)"):
        model(_ids(1, 3), labels=labels)


@pytest.mark.parametrize("value", [64, 300, -1, -99, -101])
def test_labels_outside_the_vocabulary_are_named(model, value):
    """-100 is the ignore index; any other id outside [0, vocab_size) is a ValueError naming labels, the value, where
    it is and the vocabulary size (torch's own error names neither: "IndexError: Target 300 is out of bounds")."""
    ids = _ids(2, 5)
    labels = ids.clone()
    labels[0, 2] = -100
    labels[1, 3] = value
    words = (rf"labels: expected token ids in \[0, vocab_size=64\) or -100 \(ignored\), got {value} at labels\[1, 3\] "
             rf"\(1 target\(s\) out of range")
    with pytest.raises(ValueError, match=words):
        model(ids, labels=labels)
    with pytest.raises(ValueError, match=words):  # the transformers spelling of the same call
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def test_labels_the_loss_does_not_read_are_not_checked(model):
    """The first column is never a target, and padded positions are ignored by the loss: an id there is not an
    error (the loss equals the one with those labels replaced by -100)."""
    ids = _ids(2, 5)
    labels, mask = ids.clone(), torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    labels[:, 0] = 1000
    labels[1, 1] = 1000
    with torch.no_grad():
        loss = model(ids, attention_mask=mask, labels=labels).loss
        clean = labels.clone()
        clean[:, 0] = clean[1, 1] = -100
        assert torch.equal(loss, model(ids, attention_mask=mask, labels=clean).loss)


def test_the_static_step_past_the_end_of_the_cache_names_it(model):
    """Checked where it costs no host sync: the mirror of the length right after a prefill, and the position
    itself on the CPU after static steps (the error names the cache and its capacity, not index_copy_'s index)."""
    words = r"cache overflow: the static decode step would write position 6, past the end of the SambaYCache " \
            r"\(max_length=6"
    with torch.no_grad():
        full = model.allocate_cache(1, 6)
        model(_ids(1, 6), cache=full)  # full after the prefill: the mirror knows
        with pytest.raises(CacheError, match=words):
            model(_ids(1, 1), cache=full, static=True)
        cache = model.allocate_cache(1, 6)
        model(_ids(1, 4), cache=cache)
        for _ in range(2):  # positions 4 and 5; then the mirror is stale and the position is read on the CPU
            model(_ids(1, 1), cache=cache, static=True)
        with pytest.raises(CacheError, match=words):
            model(_ids(1, 1), cache=cache, static=True)
    assert cache.length == 6


def test_generate_checks_a_passed_cache_once_before_any_work(model):
    cache = model.allocate_cache(1, 6)
    with pytest.raises(CacheError, match=r"cache: this generate call writes 7 positions \(a prompt of 4 and "
                                         r"max_new_tokens=4, the last token not fed back\), but the SambaYCache passed "
                                         r"holds max_length=6"):
        model.generate(_ids(1, 4), max_new_tokens=4, cache=cache)
    assert cache.length == 0
    assert model.generate(_ids(1, 4), max_new_tokens=3, cache=cache).shape == (1, 7)  # 6 positions written: fits
