"""Full forward against the reference fixtures (HF modeling code, fp32), layer by layer."""

import json

import pytest
import torch
from helpers import CONFIGS, FIXTURES, assert_close, fixture_model, load_fixture, rel_err

from sambay import SambaYConfig, SambaYForCausalLM
from sambay.layers import to_reference_layout

FP32 = 1e-4


def _run_with_taps(model, ids, mask):
    """Full forward, recording each layer's output, the memory and the shared K/V through hooks."""
    taps, cfg, handles = {}, model.config, []
    for i, block in enumerate(model.model.layers):
        handles.append(block.register_forward_hook(lambda m, a, out, i=i: taps.__setitem__(f"hidden.{i}", out[0])))
    handles.append(model.model.layers[cfg.memory_layer].attn.register_forward_hook(
        lambda m, a, out: taps.__setitem__("memory", out[1])))
    proj = model.model.layers[cfg.kv_layer].attn.project

    def project(x):
        q, k, v = proj(x)
        taps["shared_k"], taps["shared_v"] = to_reference_layout(k, v)
        return q, k, v

    model.model.layers[cfg.kv_layer].attn.project = project
    try:
        with torch.no_grad():
            taps["logits"] = model(ids, attention_mask=mask).logits
    finally:
        del model.model.layers[cfg.kv_layer].attn.project
        for h in handles:
            h.remove()
    return taps


@pytest.mark.parametrize("name", ["tiny8", "small16"])
def test_full_forward_matches_fixture_layer_by_layer(name):
    _, inp, exp, _ = load_fixture(name)
    model = fixture_model(name)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    taps = _run_with_taps(model, ids, mask)
    real = mask.bool()
    keys = [f"hidden.{i}" for i in range(model.config.num_hidden_layers)] + ["memory", "logits"]
    for key in keys:  # in layer order, so the first failure names the layer that broke
        assert_close(key, taps[key][real], exp[key][real], FP32)
    for key in ("shared_k", "shared_v"):  # (B, Hkv, T, D): compare real positions per row
        for b in range(ids.shape[0]):
            assert_close(f"{key}[{b}]", taps[key][b][:, real[b]], exp[key][b][:, real[b]], FP32)


def test_left_padded_row_equals_unpadded_run():
    _, inp, exp, _ = load_fixture("small16")
    model = fixture_model("small16")
    ids, mask = inp["input_ids"], inp["attention_mask"]
    n_pad = int((mask[1] == 0).sum())
    assert n_pad > 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits[1, n_pad:]
        alone = model(ids[1:, n_pad:]).logits[0]
    assert_close("padded row vs alone", padded, alone, 1e-5)


def _bf16_floor_model(name):
    """fp32 compute with every bf16-stored weight rounded to bf16: the error no bf16 model can beat."""
    model = fixture_model(name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not (n.endswith((".A_log", ".D")) or "lambda" in n):
                p.copy_(p.bfloat16().float())
    return model


def _bf16_errors(model, floor, name):
    _, inp, exp, _ = load_fixture(name)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    real = mask.bool()
    taps, ftaps = _run_with_taps(model, ids, mask), _run_with_taps(floor, ids, mask)
    keys = [f"hidden.{i}" for i in range(model.config.num_hidden_layers)] + ["logits"]
    return {k: (rel_err(taps[k][real], exp[k][real]), rel_err(ftaps[k][real], exp[k][real])) for k in keys}, taps, ftaps


BF16_EPS = 2.0**-8


@pytest.mark.parametrize("name", ["tiny8", "small16"])
def test_bf16_model_tracks_fp32_reference(name):
    """bf16 is judged against the fp32 fixture. The bound is flash-attn's idiom: at most twice the error
    that bf16 weights alone cause (fp32 compute, rounded weights), plus one bf16 rounding."""
    model = fixture_model(name, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    errors, taps, ftaps = _bf16_errors(model, _bf16_floor_model(name), name)
    assert taps["logits"].dtype == torch.bfloat16
    for key, (err, floor) in errors.items():
        assert err <= 2 * floor + BF16_EPS, f"{key}: bf16 error {err:.3g} > 2 x floor {floor:.3g} + eps"
    # Argmax: these random fixtures have many near-ties (bf16 weights alone flip 3-4% of argmaxes), so
    # agreement is required where the fp32 top-2 margin exceeds 3x the floor's RMS logit error.
    _, inp, exp, _ = load_fixture(name)
    real = inp["attention_mask"].bool()
    ref = exp["logits"][real]
    rms = (ftaps["logits"][real] - ref).pow(2).mean().sqrt()
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 3 * rms
    assert decided.float().mean() >= 0.7, "too few decided positions for the argmax check to mean anything"
    agree = (taps["logits"][real].argmax(-1) == ref.argmax(-1))[decided].float().mean().item()
    assert agree >= 0.99, f"bf16 argmax agrees at {agree:.3f} of decided positions"


def test_bf16_bound_rejects_a_slightly_wrong_model():
    """Guards the bf16 bound above: 5% more weight on one layer's Wqkv must break it."""
    model = fixture_model("small16", dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[3].attn.Wqkv.weight.mul_(1.05)
    errors, _, _ = _bf16_errors(model, _bf16_floor_model("small16"), "small16")
    assert any(err > 2 * floor + BF16_EPS for err, floor in errors.values())


def test_released_config_builds_on_meta_with_the_checkpoint_keys():
    manifest = json.loads((FIXTURES / "phi4-mini-flash-reasoning" / "keys.json").read_text())
    expected = {t["key"]: tuple(t["shape"]) for t in manifest["tensors"]}
    config = SambaYConfig.from_pretrained(CONFIGS / "phi4-mini-flash-reasoning.json")
    with torch.device("meta"):
        model = SambaYForCausalLM(config, dtype=torch.bfloat16)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert len(params) == manifest["n_tensors"] == 434
    assert params == expected
    assert sum(p.numel() for p in model.parameters()) == manifest["n_params"] == 3_852_562_944
    assert all(p.device.type == "meta" for p in model.parameters())
    fp32 = {t["key"] for t in manifest["tensors"] if t["dtype"] == "float32"}  # A_log and the lambdas
    assert fp32 and all(dict(model.named_parameters())[k].dtype == torch.float32 for k in fp32)


@pytest.mark.parametrize("keep", [1, 5])
def test_logits_to_keep_equals_last_rows_of_full_forward(keep):
    _, inp, _, _ = load_fixture("small16")
    model = fixture_model("small16")
    ids, mask = inp["input_ids"], inp["attention_mask"]
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        last = model(ids, attention_mask=mask, logits_to_keep=keep).logits
    assert last.shape == (2, keep, model.config.vocab_size)
    assert_close("logits_to_keep", last, full[:, -keep:], 1e-5)


def test_attention_mask_of_wrong_shape_is_rejected():
    model = fixture_model("tiny8")
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(1, 5\)"):
        model(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
