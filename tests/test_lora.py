"""LoRA through peft: sambay's module names work as target modules, and only the adapters train."""

from __future__ import annotations

import pytest
import torch
from helpers import FIXTURES, fixture_model, load_fixture

peft = pytest.importorskip("peft")

TARGETS = ["Wqkv", "out_proj", "in_proj", "x_proj", "dt_proj", "fc1", "fc2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _lora_model(seed: int = 0):
    base = fixture_model("small16")
    expected_targets = sorted(n for n, m in base.named_modules()
                              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(base, config), expected_targets


def _inputs():
    _, inputs, _, _ = load_fixture("small16")
    return inputs["input_ids"], inputs["attention_mask"]


@pytest.mark.slow
def test_lora_targets_every_named_projection_and_only_adapters_train():
    model, expected_targets = _lora_model()
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if isinstance(m, peft.tuners.lora.LoraLayer))
    assert adapted == expected_targets
    assert len({n.split(".")[2] for n in adapted}) == 16  # every decoder layer got adapters
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(expected_targets)


@pytest.mark.slow
def test_every_adapter_receives_a_gradient():
    """lora_B starts at zero, so at step 0 only lora_B has a gradient: every one must have a nonzero one
    (an adapter whose module the model bypasses, e.g. by reading ``.weight`` directly, gets none)."""
    model, _ = _lora_model()
    ids, mask = _inputs()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    dead = [n for n, p in model.named_parameters()
            if ".lora_B." in n and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert not dead, f"adapters without gradient: {dead}"
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.slow
def test_lora_training_changes_only_adapters_and_merges_exactly():
    model, _ = _lora_model()
    ids, mask = _inputs()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    base_logits = model(input_ids=ids, attention_mask=mask).logits.detach()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    tuned = model(input_ids=ids, attention_mask=mask).logits.detach()
    assert (tuned - base_logits).abs().max() > 1e-2
    # Merging folds B @ A into each weight: the plain sambay model then computes what the adapters did,
    # which holds only if the forward really called every adapted module.
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "SambaYForCausalLM"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, attention_mask=mask).logits, tuned, rtol=1e-4, atol=1e-4)


def test_peft_causal_lm_task_on_the_transformers_model():
    """The usual transformers recipe (AutoModelForCausalLM + task_type="CAUSAL_LM") trains the same adapters."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from sambay import hf

    if not hf.register():
        pytest.skip("transformers has its own phi4flash")
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny8")
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS)
    model = peft.get_peft_model(base, config)
    ids = load_fixture("tiny8")[1]["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    dead = [n for n, p in trainable.items() if ".lora_B." in n and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert not dead, f"adapters without gradient: {dead}"
    assert model.generate(input_ids=ids[:, :5], max_new_tokens=3).shape == (1, 8)


@pytest.mark.slow
def test_peft_causal_lm_task_on_the_plain_model(tmp_path):
    """task_type="CAUSAL_LM" wraps the plain SambaYForCausalLM too (peft reads config.model_type, passes its
    forward plumbing unset, records name_or_path); the adapter reloads onto a fresh base with the same logits."""
    base = fixture_model("tiny8")
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    assert type(model).__name__ == "PeftModelForCausalLM"
    ids = load_fixture("tiny8")[1]["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(model.generate(input_ids=ids[:, :5], max_new_tokens=3)[:, :5], ids[:, :5])
    model.save_pretrained(tmp_path)
    import json

    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        FIXTURES / "tiny8")
    again = peft.PeftModel.from_pretrained(fixture_model("tiny8"), tmp_path)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.equal(again(input_ids=ids).logits, ref)
        assert not torch.equal(fixture_model("tiny8")(ids).logits, ref)  # the adapters change the logits
