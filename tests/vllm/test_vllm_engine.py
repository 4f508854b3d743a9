"""The vLLM plugin against sambay's own forward and generate (fp32, random weights): greedy tokens and prompt
logprobs, one prompt, a batch arriving together and staggered (continuous batching), prompts past the sliding
window, chunked prefill on and off, the YOCO prefill skip, the decode-state bytes, the released key names."""

from __future__ import annotations

import pytest
import torch
from vllm_helpers import (
    CHUNK,
    CONFIG,
    MAX_MODEL_LEN,
    PROMPTS,
    close,
    engine,
    fp32_logprob_tolerance,
    greedy,
    sambay_greedy,
    sambay_model,
    sambay_prompt_logprobs,
    save_checkpoint,
    tokens_prompt,
    vllm_prompt_logprobs,
)

from sambay import SambaYConfig, cache_nbytes

NEW = 24  # generated tokens: past the window of 16 for every prompt


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("sambay-random")
    save_checkpoint(d)
    return d


@pytest.fixture(scope="module")
def reference():
    return sambay_model().eval()


@pytest.fixture(scope="module")
def expected(reference):
    """sambay's greedy continuation of every prompt, each generated alone."""
    return [sambay_greedy(reference, p, NEW) for p in PROMPTS]


# chunked: prompts longer than CHUNK tokens are prefilled in several steps; whole: one step each;
# yoco: chunked, with --kv-sharing-fast-prefill (the cross-decoder on the kept rows only).
MODES = {"chunked": {"chunked": True}, "whole": {"chunked": False}, "yoco": {"chunked": True, "fast_prefill": True}}


@pytest.fixture(scope="module")
def engines(checkpoint):
    """mode -> its engine, built on first use and kept for the module (about 1 GB of KV cache each). They are
    closed together at the end: in-process engines share vLLM's distributed state, which closing one tears down."""
    built = {}

    def get(mode, directory=None):
        if mode not in built:
            built[mode] = engine(directory or checkpoint, **MODES.get(mode, {"chunked": False}))
            built[mode].mode = mode
        return built[mode]

    yield get
    for e in built.values():
        close(e)


@pytest.fixture(params=list(MODES))
def llm(request, engines):
    return engines(request.param)


def test_one_prompt_tokens_and_prompt_logprobs(llm, reference, expected):
    prompt = PROMPTS[1]  # 40 tokens: past the window, and 3 chunks when chunked
    with_logprobs = llm.mode != "yoco"  # vLLM refuses prompt logprobs under the fast prefill (tested below)
    [out] = llm.generate([tokens_prompt(prompt)], greedy(NEW, prompt_logprobs=with_logprobs), use_tqdm=False)
    assert list(out.outputs[0].token_ids) == expected[1]
    if with_logprobs:
        ref = sambay_prompt_logprobs(reference, prompt)
        got = vllm_prompt_logprobs(out)
        tol = fp32_logprob_tolerance(ref)
        err = (got - ref).abs().max().item()
        assert err <= tol, f"prompt logprobs: max |vLLM - sambay| = {err:.3g} > {tol:.3g}"


def test_batch_arriving_together(llm, expected):
    outs = llm.generate([tokens_prompt(p) for p in PROMPTS], greedy(NEW), use_tqdm=False)
    for i, out in enumerate(outs):
        assert list(out.outputs[0].token_ids) == expected[i], f"prompt {i} (length {len(PROMPTS[i])})"


def test_batch_staggered(llm, expected):
    """Requests join while others decode (and, chunked, while others are still prefilling)."""
    eng = llm.llm_engine
    done: dict[str, list[int]] = {}
    pending = list(enumerate(PROMPTS))
    step = 0
    while pending or eng.has_unfinished_requests():
        if pending and step % 3 == 0:  # a new request every third step
            i, p = pending.pop(0)
            eng.add_request(f"{llm.mode}-stagger-{i}", tokens_prompt(p), greedy(NEW))
        for out in eng.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        assert step < 10 * (NEW + len(PROMPTS) * MAX_MODEL_LEN // CHUNK), "the engine stopped making progress"
    for i in range(len(PROMPTS)):
        assert done[f"{llm.mode}-stagger-{i}"] == expected[i], f"prompt {i} (length {len(PROMPTS[i])})"


def _runner(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def test_decode_state_bytes_equal_sambay_formula(engines):
    """vLLM's cache specs: the full-attention layer owns per-token K/V, each sliding layer per-token K/V within its
    window, each Mamba layer one (conv, ssm) state per sequence, the cross layers nothing. Their bytes for one
    sequence of L tokens equal sambay.cache_nbytes (less its 1-byte-per-position validity mask, which vLLM does
    not keep)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec

    c = SambaYConfig.from_dict(CONFIG)
    specs = _runner(engines("chunked")).get_kv_cache_spec()
    roles = {name: c.layer_types[int(name.split(".")[2])] for name in specs}
    assert sorted(set(roles.values())) == ["full_attention", "mamba", "sliding_attention"]
    assert list(roles.values()).count("full_attention") == 1  # the one shared KV cache; cross layers own none
    for L in (c.sliding_window // 2, 3 * c.sliding_window):
        total = 0
        for spec in specs.values():
            if isinstance(spec, MambaSpec):
                total += sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                             for s, d in zip(spec.shapes, spec.dtypes))
            elif isinstance(spec, SlidingWindowSpec):
                assert spec.sliding_window == c.sliding_window
                total += min(L, spec.sliding_window) * spec.page_size_bytes // spec.block_size
            else:
                assert isinstance(spec, FullAttentionSpec)
                total += L * spec.page_size_bytes // spec.block_size
        assert total == cache_nbytes(c, 1, L, torch.float32) - L, f"L={L}"


def test_released_key_names_match_the_reference_logits(engines, tmp_path):
    """The tiny8 fixture: a checkpoint written by the Hugging Face reference code (the released key names, no
    lm_head, auto_map naming remote code), loaded without trust_remote_code; the prompt logprobs equal the
    reference's logits (fp32)."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny8"
    ids = load_file(fixture / "inputs.safetensors")["input_ids"][0].tolist()
    logits = load_file(fixture / "expected.safetensors")["logits"][0, :-1].double()
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    for name in ("config.json", "model.safetensors"):  # vLLM would read the fixture's other .safetensors too
        shutil.copy(fixture / name, tmp_path / name)
    llm = engines("tiny8", tmp_path)
    [out] = llm.generate([tokens_prompt(ids)], greedy(1, prompt_logprobs=True), use_tqdm=False)
    err = (vllm_prompt_logprobs(out) - ref).abs().max().item()
    assert err <= fp32_logprob_tolerance(ref), f"max |vLLM - HF reference| = {err:.3g}"


def test_yoco_refuses_prompt_logprobs(engines):
    """Under the fast prefill the rows before each sequence's last one are never computed: a request for prompt
    logprobs must get an error, never numbers (the server refuses it up front: test_vllm_server.py; offline, vLLM's
    model runner asserts, which leaves that in-process engine unusable: this test runs last).
    Without the flag they are exact (test_one_prompt_tokens_and_prompt_logprobs)."""
    llm = engines("yoco")
    with pytest.raises((ValueError, AssertionError), match="kv-sharing-fast-prefill"):
        llm.generate([tokens_prompt(PROMPTS[1])], greedy(2, prompt_logprobs=True), use_tqdm=False)
