"""Training: the loss, gradients through every layer, gradient checkpointing, dropout, a few optimizer steps."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import fixture_model, load_fixture, random_model

from sambay import SambaYForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Written out: position t predicts labels[t+1]; targets that are padding or -100 do not count."""
    losses = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if mask[b, t + 1] and labels[b, t + 1] != -100:
                losses.append(-torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("name", ["tiny8", "small16"])
def test_loss_matches_cross_entropy_of_fixture_logits(name):
    """small16's row 1 is left-padded: its padding must not count as targets."""
    _, inputs, expected, _ = load_fixture(name)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.clone()
    labels[0, 5:8] = -100  # ignored targets
    model = fixture_model(name)
    with torch.no_grad():
        loss = model(ids, attention_mask=mask, labels=labels).loss
    ref = _reference_loss(expected["logits"], labels, mask)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item(), (loss.item(), ref.item())
    if not bool(mask.all()):  # the comparison is sharp enough to see padded targets counted
        assert abs(_reference_loss(expected["logits"], labels, torch.ones_like(mask)).item() - ref.item()) > 1e-3


def test_every_parameter_gets_a_nonzero_gradient():
    """All 16 layers of small16 (every role, several of each), with a left-padded row, the tied head."""
    _, inputs, _, _ = load_fixture("small16")
    model = fixture_model("small16").train()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    assert len(params) == 222  # the checkpoint's tensors (lm_head is the tied embedding)
    dead = [n for n, p in params.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"parameters without gradient: {dead}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in params.values())


def _grads(model: SambaYForCausalLM, ids, mask, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _with_config(model: SambaYForCausalLM, **changes) -> SambaYForCausalLM:
    """The same weights under a config with ``changes`` (e.g. dropouts)."""
    other = SambaYForCausalLM(dataclasses.replace(model.config, **changes))
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients():
    """With dropout on, so the recomputation must replay the same random masks."""
    _, inputs, _, _ = load_fixture("small16")
    base = fixture_model("small16")
    model = _with_config(base, resid_pdrop=0.1, attention_dropout=0.1).train()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    calls = []
    model.model.layers[3].register_forward_pre_hook(lambda *a: calls.append(1))

    plain = _grads(model, ids, mask, seed=7)
    assert len(calls) == 1
    model.gradient_checkpointing_enable()
    calls.clear()
    ckpt = _grads(model, ids, mask, seed=7)
    assert len(calls) == 2, "the decoder layer was not recomputed in backward"
    model.gradient_checkpointing_disable()
    calls.clear()
    again = _grads(model, ids, mask, seed=7)
    assert len(calls) == 1

    other_seed = _grads(model, ids, mask, seed=8)  # dropout is really on: a different seed changes gradients
    assert not torch.allclose(other_seed["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(again[name], plain[name], rtol=0, atol=0, msg=name)


def test_checkpointing_is_inactive_in_eval_and_no_grad():
    model = fixture_model("tiny8")
    model.gradient_checkpointing_enable()
    ids = load_fixture("tiny8")[1]["input_ids"]
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        ref = model.train()(ids).logits
    out = model.eval()(ids).logits
    out.sum().backward()
    assert len(calls) == 2  # one call each: no recomputation
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("changes", [
    pytest.param({"resid_pdrop": 0.3}, id="resid"),
    pytest.param({"attention_dropout": 0.3}, id="attention"),
])
def test_train_applies_dropout_and_eval_removes_it(changes):
    _, inputs, expected, _ = load_fixture("tiny8")
    ids = inputs["input_ids"]
    base = fixture_model("tiny8")
    model = _with_config(base, **changes)
    with torch.no_grad():
        no_dropout = base.train()(ids).logits  # p = 0: training mode alone changes nothing
        torch.manual_seed(1)
        train1 = model.train()(ids).logits
        train2 = model(ids).logits
        torch.manual_seed(1)
        train1_again = model(ids).logits
        evaluated = model.eval()(ids).logits
    torch.testing.assert_close(no_dropout, base.eval()(ids).logits.detach(), rtol=0, atol=0)
    torch.testing.assert_close(evaluated, no_dropout, rtol=0, atol=0)
    torch.testing.assert_close(evaluated, expected["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(train1_again, train1, rtol=0, atol=0)
    assert (train1 - evaluated).abs().max() > 1e-2
    assert (train2 - train1).abs().max() > 1e-2


@pytest.mark.slow
def test_a_few_optimizer_steps_drive_the_loss_down():
    torch.manual_seed(0)
    model = random_model(seed=0).train()
    ids = torch.tensor([[5, 9, 13, 17, 21, 25] * 4])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0  # starts near chance (vocabulary 64: ln 64 = 4.2) ...
    assert losses[-1] < 0.25 * losses[0], losses  # ... and learns the period-6 sequence
