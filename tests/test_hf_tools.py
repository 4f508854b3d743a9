"""The Hugging Face tools end to end on the tiny8 fixture with a word-level tokenizer: pipeline, lm-eval, Trainer
(with activation checkpointing), peft, loading in a fresh process through the auto_map, and the forward
arguments they use (inputs_embeds, output_hidden_states, use_cache), resizing and the saved files."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, fixture_model, load_fixture

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from transformers import AutoModelForCausalLM  # noqa: E402

from sambay import hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _prints_no_warning(capfd, request):
    """Normal use with the tools prints no warning: transformers' log records at WARNING and above (its once-only
    warnings re-armed for every test), Python warnings, and lines on stderr that warn or announce a deprecation.
    A test marked ``allowed_warnings(text, ...)`` may print those texts (each says why)."""
    marker = request.node.get_closest_marker("allowed_warnings")
    allowed = marker.args if marker else ()
    transformers.utils.logging.warning_once.cache_clear()
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        root.removeHandler(handler)
    err = capfd.readouterr().err
    def unexpected(texts):
        return [t for t in texts if not any(a in t for a in allowed)]

    noisy = unexpected(line for line in err.splitlines() if re.search(r"warn|deprecat", line, re.IGNORECASE))
    assert not unexpected(r.getMessage() for r in records)
    assert not unexpected(f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught)
    assert not noisy, noisy


@pytest.fixture(scope="module", autouse=True)
def _registered():
    if not hf.register():
        pytest.skip("this transformers ships its own phi4flash")


def _tokenizer():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", padding_side="left")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """tiny8 with a tokenizer, saved by sambay (so it has generation_config.json and the auto_map module)."""
    d = tmp_path_factory.mktemp("ckpt") / "tiny8"
    fixture_model("tiny8").save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


def _words(ids) -> str:
    return " ".join(f"w{int(t)}" for t in ids)


# ---- pipeline -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_text_generation_pipeline_equals_sambay_greedy(ckpt):
    pipe = transformers.pipeline("text-generation", model=str(ckpt), device="cpu")
    assert type(pipe.model) is hf.Phi4FlashForCausalLM and pipe.model.can_generate()
    prompt = "w5 w9 w17 w33 w60"
    out = pipe(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = torch.tensor([[5, 9, 17, 33, 60]])
    ref = fixture_model("tiny8").generate(ids, max_new_tokens=8, eos_token_id=2, pad_token_id=0)[0, 5:]
    assert out.split() == [f"w{int(t)}" for t in ref if int(t) > 2]
    batch = pipe(["w5 w9", "w40 w41 w42 w43"], max_new_tokens=4, do_sample=False, return_full_text=False,
                 batch_size=2)
    for text, prompt_ids in zip(batch, ([5, 9], [40, 41, 42, 43])):
        r = fixture_model("tiny8").generate(torch.tensor([prompt_ids]), max_new_tokens=4, eos_token_id=2)[0]
        assert text[0]["generated_text"].split() == [f"w{int(t)}" for t in r[len(prompt_ids):] if int(t) > 2]


# ---- lm-eval --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hflm(ckpt):
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    return huggingface.HFLM(pretrained=str(ckpt), trust_remote_code=True, device="cpu", batch_size=2)


def test_lm_eval_loglikelihood_equals_a_direct_computation(hflm):
    from lm_eval.api.instance import Instance

    pairs = [("w5 w9 w17", " w33 w60"), ("w100", " w7"), ("w3 w4 w5 w6 w7 w8", " w9 w10 w11")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = hflm.loglikelihood(reqs)
    model = fixture_model("tiny8")
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c = [int(w[1:]) for w in ctx.split()]
        t = [int(w[1:]) for w in cont.split()]
        ids = torch.tensor([c + t])
        with torch.no_grad():
            logp = model(ids).logits[0].double().log_softmax(-1)
        rows = logp[len(c) - 1:-1]
        ref = rows.gather(1, torch.tensor(t)[:, None]).sum()
        assert abs(ll - float(ref)) < 1e-4 * max(1.0, abs(float(ref))), (ll, float(ref))
        assert greedy == bool((rows.argmax(-1) == torch.tensor(t)).all())


def test_lm_eval_generate_until_equals_greedy_cut_at_the_stop_string(hflm):
    from lm_eval.api.instance import Instance

    model = fixture_model("tiny8")
    prompt = [5, 9, 17, 33]
    free = model.generate(torch.tensor([prompt]), max_new_tokens=12, eos_token_id=2)[0, 4:]
    words = [f"w{int(t)}" for t in free if int(t) > 2]
    stop = words[3]  # a word greedy decoding produces: the text ends before it
    reqs = [Instance("generate_until", {}, (_words(prompt), {"until": [stop], "max_gen_toks": 12, "do_sample": False}),
                     0)]
    (text,) = hflm.generate_until(reqs)
    assert text.split() == words[:words.index(stop)]


# ---- Trainer --------------------------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 256, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, out_dir, checkpointing: bool):
    # transformers 5.25 names it activation_checkpointing (the old name still works, with a FutureWarning)
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = transformers.TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", dataloader_num_workers=0, seed=0,
                                          **{name: checkpointing})
    return transformers.Trainer(model=model, args=args, train_dataset=_Rows())


@pytest.mark.slow
@pytest.mark.parametrize("cls", ["hf", "sambay"])
def test_trainer_with_gradient_checkpointing_trains_and_matches_plain_gradients(tmp_path, cls):
    load = (lambda: AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny8")) if cls == "hf" else \
        (lambda: fixture_model("tiny8"))
    model = load()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(model, tmp_path, checkpointing=True)
    assert model.config.use_cache is False  # what Trainer sets (a frozen SambaYConfig lets this field be set)
    calls = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda *a: calls.append(1))
    trainer.train()
    handle.remove()
    assert model.is_gradient_checkpointing
    assert len(calls) == 4, "2 steps, each layer run forward and recomputed in backward"
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    # the gradients with checkpointing equal those without (same weights, same batch)
    ids = _Rows().ids[:4]
    grads = []
    for ckpt in (True, False):
        m = load().train()
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_activation_checkpointing_every_n_layers(tmp_path):
    model = fixture_model("tiny8").train()
    model.activation_checkpointing_enable(every_n_layers=3)
    calls = {i: [] for i in range(8)}
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda *a, i=i: calls[i].append(1))
    ids = _Rows().ids[:2]
    model(ids, labels=ids).loss.backward()
    assert [len(calls[i]) for i in range(8)] == [2, 1, 1, 2, 1, 1, 2, 1]
    with pytest.raises(ValueError, match="every_n_layers: expected an integer >= 1, got 0"):
        model.activation_checkpointing_enable(every_n_layers=0)


# ---- loading in any process, saved files, names --------------------------------------------------------
@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_a_process_that_never_imports_sambay_loads_the_checkpoint_with_trust_remote_code(ckpt, tmp_path):
    ids = load_fixture("tiny8")[1]["input_ids"]
    with torch.no_grad():
        ref = fixture_model("tiny8")(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch\n"
            "from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True)\n"
            "assert type(model).__name__ == 'Phi4FlashForCausalLM', type(model)\n"
            f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
            "with torch.no_grad():\n"
            f"    torch.save(model(ids).logits, {str(tmp_path / 'logits.pt')!r})\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), ref)


def test_saved_config_and_generation_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "modeling_sambay.Phi4FlashConfig",
                               "AutoModelForCausalLM": "modeling_sambay.Phi4FlashForCausalLM"}
    assert cfg["transformers_version"] == transformers.__version__  # not the fixture's stale 4.46.1
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.generation_config.eos_token_id == 2 and model.name_or_path == str(ckpt)


def test_from_pretrained_accepts_the_standard_arguments_at_their_defaults(ckpt):
    model = AutoModelForCausalLM.from_pretrained(ckpt, gguf_file=None, max_memory=None, quantization_config=None,
                                                 device_map={"": "cpu"}, revision="main", subfolder="",
                                                 dtype="auto", trust_remote_code=False)
    assert model.device.type == "cpu"
    with pytest.raises(TypeError, match=r"device_map: sambay loads onto one device"):
        AutoModelForCausalLM.from_pretrained(ckpt, device_map={"model": "cpu", "lm_head": "meta"})
    with pytest.raises(TypeError, match=r"unsupported arguments .*gguf_file='x.gguf'"):
        hf.Phi4FlashForCausalLM.from_pretrained(ckpt, gguf_file="x.gguf")


@pytest.mark.slow
def test_peft_adapter_records_its_base_model(ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(ckpt)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["fc1"]))
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(ckpt)
    again = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ids = load_fixture("tiny8")[1]["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


# transformers' own notice about its default (mean_resizing=True), printed for every model it resizes
@pytest.mark.allowed_warnings("The new embeddings will be initialized from a multivariate normal distribution")
def test_resize_token_embeddings_then_save_loads(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny8")
    model.resize_token_embeddings(300)
    assert model.config.vocab_size == 300 and model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 300
    ids = torch.tensor([[5, 290, 17, 299]])
    with torch.no_grad():
        ref = model(ids).logits
        assert ref.shape[-1] == 300
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, ref)
    assert model.generate(ids, max_new_tokens=3).shape == (1, 7)  # the cache is built for the new config


# ---- forward arguments ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["hf", "sambay"])
def test_inputs_embeds_equals_input_ids_and_hidden_states(cls):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny8") if cls == "hf" else fixture_model("tiny8")
    _, inputs, _, _ = load_fixture("tiny8")
    ids = inputs["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids)
        emb = model.get_input_embeddings()(ids)
        out = model(inputs_embeds=emb, labels=ids, output_hidden_states=True)
        kept = model(input_ids=ids, output_hidden_states=True, logits_to_keep=2)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    hs = out.hidden_states
    assert len(hs) == 9 and torch.equal(hs[0], emb) and all(h.shape == emb.shape for h in hs)
    assert torch.equal(model.lm_head(hs[-1]), out.logits)  # the last is the final-norm output
    # YOCO skip: the full-attention layer (5) and the cross-decoder (6, 7) compute the kept rows only
    assert [h.shape[1] for h in kept.hidden_states] == [ids.shape[1]] * 6 + [2] * 3
    torch.testing.assert_close(kept.hidden_states[-1], hs[-1][:, -2:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(input_ids=ids, inputs_embeds=emb)


def test_use_cache_is_honest():
    model = fixture_model("tiny8")
    ids = load_fixture("tiny8")[1]["input_ids"]
    with pytest.raises(ValueError, match="use_cache=True: sambay's decode state is allocated once"):
        model(ids, use_cache=True)
    cache = model.allocate_cache(ids.shape[0], ids.shape[1] + 4)
    with pytest.raises(ValueError, match="use_cache=False contradicts the cache"):
        model(ids, cache=cache, use_cache=False)
    hf_model = AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny8")
    with torch.no_grad():
        out = hf_model(input_ids=ids, past_key_values=cache)  # the older name: accepted, without a warning
        assert _cache_of(out) is cache and cache.length == ids.shape[1]
        cache.reset()
        out = hf_model(input_ids=ids, cache=cache)  # transformers 5's name
    assert _cache_of(out) is cache and cache.length == ids.shape[1]


def _cache_of(out):
    """The output's cache under the name its class declares (``cache`` in current transformers 5, where reading
    the older ``past_key_values`` logs transformers' own deprecation line)."""
    return out.cache if "cache" in type(out).__dataclass_fields__ else out.past_key_values


def test_checkpoint_copy_without_tokenizer_still_loads(tmp_path, ckpt):
    """The auto_map module is a plain file of the checkpoint: copying the directory keeps it loadable."""
    d = tmp_path / "copy"
    shutil.copytree(ckpt, d)
    assert type(AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)) is hf.Phi4FlashForCausalLM
