"""generate() with the transformers arguments: each equals a reference loop that recomputes the full forward at
every step and processes the logits with transformers' own LogitsProcessors; argument validation (issue 10);
non-finite logits; host syncs per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_model

from sambay.generation import NonFiniteLogitsError

transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig  # noqa: E402
from transformers.generation import logits_process as lp  # noqa: E402
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FP32 = 1e-4


@pytest.fixture(scope="module")
def model():
    return random_model(seed=21, sliding_window=4)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def _reference(model, ids, mask, n, processors=(), warpers=(), sample=False, eos=None, pad=0, min_new=0):
    """transformers' greedy/sample loop written out: full forward over the sequence so far at every step."""
    procs = list(processors)
    if min_new and eos is not None:
        procs.append(lp.MinNewTokensLengthLogitsProcessor(ids.shape[1], min_new, torch.tensor(eos)))
    procs += list(warpers)
    seq, done, all_logits = ids, torch.zeros(ids.shape[0], dtype=torch.bool), []
    for _ in range(n):
        m = None if mask is None else torch.cat([mask, torch.ones(ids.shape[0], seq.shape[1] - ids.shape[1],
                                                                  dtype=mask.dtype)], 1)
        with torch.no_grad():
            logits = model(seq, attention_mask=m).logits[:, -1].float()
        all_logits.append(logits)
        scores = logits
        for p in procs:
            scores = p(seq, scores)
        tok = torch.multinomial(scores.softmax(-1), 1)[:, 0] if sample else scores.argmax(-1)
        if eos is not None:
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            done |= torch.isin(tok, torch.tensor(eos))
        seq = torch.cat([seq, tok[:, None]], 1)
        if eos is not None and bool(done.all()):
            break
    return seq, all_logits


@pytest.mark.slow
def test_greedy_with_max_length_and_a_generation_config_equals_the_reference(model, prompts):
    ids, mask = prompts
    ref, _ = _reference(model, ids, mask, 9)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=9), ref)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_length=16), ref)  # max_length counts the prompt
    assert torch.equal(model.generate(inputs=ids, attention_mask=mask, generation_config=GenerationConfig(
        max_new_tokens=9, do_sample=False)), ref)
    # keyword arguments override the generation_config, as in transformers
    assert torch.equal(model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=3),
                                      max_new_tokens=9), ref)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=9, use_cache=False), ref)


@pytest.mark.slow
def test_repetition_penalty_equals_transformers_processor(model, prompts):
    ids, mask = prompts
    ref, _ = _reference(model, ids, mask, 10, processors=[lp.RepetitionPenaltyLogitsProcessor(1.8)])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, repetition_penalty=1.8)
    assert torch.equal(out, ref)
    assert not torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=10))  # it did something


@pytest.mark.slow
def test_min_new_tokens_and_min_length_hold_back_eos(model, prompts):
    ids, mask = prompts
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    eos = int(free[0, 7])  # row 0's first new token: without min_new_tokens it stops at once
    assert model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos)[0, 7] == eos
    ref, _ = _reference(model, ids, mask, 10, eos=[eos], min_new=4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0,
                         min_new_tokens=4)
    assert torch.equal(out, ref) and eos not in out[:, 7:11]
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0,
                                      min_length=11), ref)


def test_eos_lists_and_integer_types(model, prompts):
    ids, mask = prompts
    free = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    eos = [int(free[0, 9]), int(free[1, 8])]
    ref, _ = _reference(model, ids, mask, 8, eos=eos, pad=1)
    for e in (eos, tuple(eos), np.array(eos), torch.tensor(eos), [np.int64(eos[0]), torch.tensor(eos[1])]):
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=e,
                                          pad_token_id=np.int32(1)), ref)


@pytest.mark.parametrize("kw", [
    pytest.param(dict(temperature=0.7), id="temperature"),
    pytest.param(dict(top_k=5), id="top_k"),
    pytest.param(dict(top_p=0.8, top_k=0), id="top_p"),
    pytest.param(dict(temperature=1.3, top_k=7, top_p=0.9, repetition_penalty=1.3), id="all"),
])
@pytest.mark.slow
def test_sampling_equals_transformers_warpers_under_the_same_seed(model, prompts, kw):
    ids, mask = prompts
    warpers = []
    if kw.get("temperature", 1.0) != 1.0:
        warpers.append(lp.TemperatureLogitsWarper(kw["temperature"]))
    if kw.get("top_k", 50):
        warpers.append(lp.TopKLogitsWarper(kw.get("top_k", 50)))
    if kw.get("top_p", 1.0) < 1.0:
        warpers.append(lp.TopPLogitsWarper(kw["top_p"]))
    processors = [lp.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"])] if "repetition_penalty" in kw else []
    torch.manual_seed(11)
    ref, _ = _reference(model, ids, mask, 12, processors=processors, warpers=warpers, sample=True)
    torch.manual_seed(11)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, **kw)
    assert torch.equal(out, ref)
    assert not torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=12))  # really sampled


def test_num_return_sequences_repeats_each_prompt(model, prompts):
    ids, mask = prompts
    rep_ids, rep_mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_return_sequences=3)
    assert out.shape == (6, 13) and torch.equal(out, model.generate(rep_ids, attention_mask=rep_mask, max_new_tokens=6))
    g = dict(max_new_tokens=6, do_sample=True, top_k=20)
    torch.manual_seed(3)
    sampled = model.generate(ids, attention_mask=mask, num_return_sequences=3, **g)
    torch.manual_seed(3)
    assert torch.equal(sampled, model.generate(rep_ids, attention_mask=rep_mask, **g))
    assert not torch.equal(sampled[0], sampled[1])  # the copies of a prompt sample independently


def test_stopping_criteria_see_the_sequence_so_far(model, prompts):
    ids, mask = prompts
    seen = []

    class AfterFour(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen.append(input_ids.shape[1])
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 4)

    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, stopping_criteria=StoppingCriteriaList([
        AfterFour()]))
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=4))
    assert seen == [8, 9, 10, 11]


def test_scores_and_logits_equal_the_full_forward_logits(model, prompts):
    ids, mask = prompts
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True,
                         output_scores=True, output_logits=True)
    assert isinstance(out, transformers.utils.ModelOutput)
    cache = out.cache if "cache" in type(out).__dataclass_fields__ else out.past_key_values  # the new name
    assert len(out.scores) == len(out.logits) == 6 and cache.length == 12
    ref, ref_logits = _reference(model, ids, mask, 6)
    assert torch.equal(out.sequences, ref)
    for t in range(6):
        torch.testing.assert_close(out.logits[t], ref_logits[t], rtol=FP32, atol=FP32)
        assert torch.equal(out.scores[t], out.logits[t])  # greedy, no processor: the scores are the logits
    with torch.no_grad():
        full = model(out.sequences, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 6:12].float(), rtol=FP32, atol=FP32)
    pen = model.generate(ids, attention_mask=mask, max_new_tokens=3, repetition_penalty=2.0,
                         return_dict_in_generate=True, output_scores=True)
    assert pen.logits is None and not torch.equal(pen.scores[0], out.logits[0])  # processed scores


def test_generation_config_json_defaults(tmp_path, model, prompts):
    """A saved checkpoint's generation_config.json sets generate()'s defaults after loading."""
    from sambay import SambaYForCausalLM

    ids, mask = prompts
    model.generation_config = {"max_new_tokens": 5, "repetition_penalty": 1.5}
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.generation_config = {}
    loaded = SambaYForCausalLM.from_pretrained(tmp_path)
    assert loaded.generation_config["max_new_tokens"] == 5 and loaded.generation_config["eos_token_id"] == 2
    got = loaded.generate(ids, attention_mask=mask)
    assert torch.equal(got, model.generate(ids, attention_mask=mask, max_new_tokens=5, repetition_penalty=1.5,
                                           eos_token_id=2, pad_token_id=0))


# ---- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, exc, words", [
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature: expected a finite number in (0, inf)"),
    (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature: expected a real number"),
    (dict(top_k=-1), ValueError, "top_k: expected an integer >= 0, got -1"),
    (dict(top_k=2.5), TypeError, "top_k: expected an integer"),
    (dict(top_p=0.0), ValueError, "top_p: expected a finite number in (0, 1]"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(eos_token_id=64), ValueError, "eos_token_id: expected ids in [0, 64) (the vocabulary), got 64"),
    (dict(eos_token_id=[3, -1]), ValueError, "eos_token_id: expected ids in [0, 64)"),
    (dict(eos_token_id=2.0), TypeError, "eos_token_id: expected integer token id(s)"),
    (dict(eos_token_id=[]), ValueError, "eos_token_id: expected at least one token id"),
    (dict(eos_token_id=3, pad_token_id=99), ValueError, "pad_token_id: expected ids in [0, 64)"),
    (dict(pad_token_id=[0, 1]), ValueError, "pad_token_id: expected one id"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens: expected an integer >= 0"),
    (dict(max_length=3), ValueError, "max_length: expected >= the prompt length 7"),
    (dict(num_return_sequences=0), ValueError, "num_return_sequences"),
    (dict(num_beams=4), NotImplementedError, "num_beams=4 (beam search)"),
    (dict(no_repeat_ngram_size=2), NotImplementedError, "no_repeat_ngram_size"),
    (dict(use_cache=False, cache="x"), ValueError, "use_cache=False contradicts the cache"),
    (dict(max_new_tokens=2, frobnicate=1), TypeError, "unknown arguments ['frobnicate']"),
])
def test_bad_arguments_raise_clear_errors(model, prompts, kw, exc, words):
    ids, mask = prompts
    with pytest.raises(exc) as e:
        model.generate(ids, attention_mask=mask, **kw)
    assert words in str(e.value)


def test_bad_inputs_raise_clear_errors(model, prompts):
    ids, mask = prompts
    with pytest.raises(TypeError, match="input_ids: expected a 2-D integer tensor"):
        model.generate(ids.float())
    with pytest.raises(TypeError, match="input_ids: expected a 2-D integer tensor"):
        model.generate(ids[0])
    with pytest.raises(ValueError, match=r"input_ids: expected ids in \[0, 64\)"):
        model.generate(ids + 60)
    right = torch.ones_like(mask)
    right[1, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=right)


def _poison_after(model, calls: int):
    """A hook making the LM head's output non-finite from its ``calls``-th call on (1 = the prefill)."""
    count = [0]

    def hook(_mod, _inp, out):
        count[0] += 1
        return out.masked_fill(torch.zeros_like(out, dtype=torch.bool).index_fill(-1, torch.tensor([5]), True),
                               float("nan")) if count[0] >= calls else out

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("eos", [None, 63], ids=["no-eos", "eos"])
def test_non_finite_logits_raise_with_the_step(model, prompts, eos):
    ids, mask = prompts
    for sample in (False, True):
        handle = _poison_after(model, 4)
        try:
            with pytest.raises(NonFiniteLogitsError, match=r"non-finite logits \(NaN or inf\) at step 3 \(position 9"):
                model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, do_sample=sample)
        finally:
            handle.remove()


class _SyncCounter:
    """Counts the Tensor -> Python conversions (what costs a host sync on an accelerator)."""

    NAMES = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, **k):
                self.n += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("kw, per_step", [
    pytest.param({}, 0, id="greedy"),
    pytest.param(dict(do_sample=True, top_k=10, top_p=0.9, temperature=0.8), 0, id="sampling"),
    pytest.param(dict(repetition_penalty=1.2), 0, id="penalty"),
    pytest.param(dict(eos_token_id=[62, 63]), 1, id="eos"),
])
def test_host_syncs_per_step(model, monkeypatch, kw, per_step):
    """No sync per decode step without EOS (the non-finite check is one sync after the loop), one with EOS (the
    non-finite check rides on it)."""
    ids = torch.randint(3, 60, (1, 6))
    counts = {}
    for n in (4, 12):
        counter = _SyncCounter(monkeypatch)
        model.generate(ids, max_new_tokens=n, **kw)
        counts[n] = counter.n
        monkeypatch.undo()
    assert counts[12] - counts[4] == 8 * per_step, counts
