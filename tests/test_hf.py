"""Hugging Face integration: the Auto classes load sambay without trust_remote_code, save_pretrained round
trips, and hub ids resolve through huggingface_hub with errors that say what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, fixture_model, load_fixture

from sambay import SambaYConfig, SambaYForCausalLM
from sambay.loading import CheckpointError

HUB_ID = "microsoft/Phi-4-mini-flash-reasoning"


@pytest.fixture(scope="module")
def hf():
    """sambay.hf with the classes registered (what ``import sambay`` does when transformers is installed)."""
    pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from sambay import hf

    if "phi4flash" in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers ships its own phi4flash, which sambay leaves in place")
    assert hf.register() is True
    assert hf.register() is True  # idempotent
    return hf


pytestmark = pytest.mark.usefixtures("one_thread")


def _real(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()


@pytest.mark.parametrize("name", ["tiny8", "small16"])
@pytest.mark.parametrize("trust", [pytest.param({}, id="trust-unset"), pytest.param({"trust_remote_code": False},
                                                                                    id="trust-False")])
def test_auto_model_loads_a_checkpoint_with_remote_code_auto_map(hf, name, trust):
    from transformers import AutoConfig, AutoModelForCausalLM

    d, inputs, expected, _ = load_fixture(name)
    assert "AutoModelForCausalLM" in json.loads((d / "config.json").read_text())["auto_map"]  # remote code named
    assert type(AutoConfig.from_pretrained(d, **trust)) is hf.Phi4FlashConfig
    model = AutoModelForCausalLM.from_pretrained(d, **trust)
    assert type(model) is hf.Phi4FlashForCausalLM and not model.training
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        ref = fixture_model(name)(ids, attention_mask=mask, labels=ids)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)  # one code path
    assert torch.equal(out["logits"], out[1 if out.loss is not None else 0])  # a transformers ModelOutput
    real = _real(mask)
    torch.testing.assert_close(out.logits[real], expected["logits"][real], rtol=1e-4, atol=1e-4)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fixture_model(name).named_parameters()]


def test_save_pretrained_output_loads_back_through_auto_and_sambay(hf, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    fields = json.loads((FIXTURES / "tiny8" / "config.json").read_text())
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config)  # random weights (sambay's initialisation)
    assert type(model) is hf.Phi4FlashForCausalLM
    model.save_pretrained(tmp_path)
    # issue 11: the released layout plus generation_config.json and the module config.json's auto_map names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors", "modeling_sambay.py"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "phi4flash" and saved["num_hidden_layers"] == 8
    ids = load_fixture("tiny8")[1]["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
        again = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert type(again) is hf.Phi4FlashForCausalLM
        assert torch.equal(again(ids).logits, ref)
        assert torch.equal(SambaYForCausalLM.from_pretrained(tmp_path)(ids).logits, ref)
        assert not torch.equal(fixture_model("tiny8")(ids).logits, ref)  # not the fixture's weights


def test_config_converts_both_ways(hf):
    cfg = SambaYConfig.from_pretrained(FIXTURES / "small16")
    hf_cfg = hf.Phi4FlashConfig.from_sambay(cfg)
    assert hf_cfg.model_type == "phi4flash" and hf_cfg.num_hidden_layers == 16
    assert hf_cfg.to_sambay() == cfg
    assert hf.Phi4FlashConfig().to_sambay() == SambaYConfig()  # defaults agree
    changed = hf.Phi4FlashConfig.from_sambay(cfg)
    changed.sliding_window = 4
    assert changed.to_sambay().sliding_window == 4 and changed.to_sambay(cfg).extra == cfg.extra


def test_auto_model_applies_config_overrides_and_rejects_mismatched_ones(hf):
    from transformers import AutoModelForCausalLM

    d = FIXTURES / "tiny8"
    model = AutoModelForCausalLM.from_pretrained(d, resid_pdrop=0.25, dtype=torch.float64)
    assert model.model.layers[0].resid_dropout.p == 0.25 and model.sambay_config.resid_pdrop == 0.25
    assert model.dtype == torch.float64
    with pytest.raises(CheckpointError, match="wrong shape: model.layers.0.mlp.fc1.weight"):
        AutoModelForCausalLM.from_pretrained(d, intermediate_size=64)
    with pytest.raises(TypeError, match="unsupported arguments"):
        hf.Phi4FlashForCausalLM.from_pretrained(d, quantization_config={"bits": 4})


@pytest.mark.slow
def test_generate_and_gradient_checkpointing_go_through_sambay(hf):
    from transformers import AutoModelForCausalLM

    d, inputs, _, _ = load_fixture("small16")
    model = AutoModelForCausalLM.from_pretrained(d)
    ids, mask = inputs["input_ids"][:, :12], inputs["attention_mask"][:, :12]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(out, fixture_model("small16").generate(ids, attention_mask=mask, max_new_tokens=5))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.model.gradient_checkpointing


def test_register_leaves_a_native_phi4flash_alone(hf, monkeypatch):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    calls = []
    monkeypatch.setattr(AutoConfig, "register", lambda *a, **k: calls.append(a))
    monkeypatch.setitem(CONFIG_MAPPING_NAMES, "phi4flash", "Phi4FlashConfig")
    assert hf.register() is False and calls == []
    monkeypatch.delitem(CONFIG_MAPPING_NAMES, "phi4flash")
    assert hf.register() is True and calls  # the spy does see a registration when there is none


def _run_python(code: str) -> None:
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_without_transformers_importing_and_registering_do_nothing():
    _run_python("import sys; sys.modules['transformers'] = None\n"
                "import sambay, sambay.hf\n"
                "assert sambay.hf.register() is False\n"
                "assert sambay.hf.Phi4FlashConfig is None and sambay.hf.Phi4FlashForCausalLM is None\n")


@pytest.mark.slow
def test_registering_is_light_and_the_model_class_comes_with_the_first_config(hf):
    """register() leaves PreTrainedModel (torch._dynamo, triton) unimported; a fresh process still gets
    sambay's model from AutoModelForCausalLM, defined when AutoConfig builds the first phi4flash config."""
    _run_python("import sys, sambay.hf\n"
                "assert sambay.hf.register()\n"
                "heavy = [m for m in ('transformers.modeling_utils', 'torch._dynamo', 'triton') if m in sys.modules]\n"
                "assert not heavy, heavy\n"
                "from transformers import AutoModelForCausalLM\n"
                f"model = AutoModelForCausalLM.from_pretrained({str(FIXTURES / 'tiny8')!r})\n"
                "assert type(model) is sambay.hf.Phi4FlashForCausalLM, type(model)\n")


# ---- hub ids ----------------------------------------------------------------------------------------
def test_hub_id_resolves_through_snapshot_download(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    asked = []

    def fake_snapshot_download(repo_id, **kwargs):  # the cache already holds the snapshot
        asked.append(repo_id)
        return str(FIXTURES / "tiny8")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    _, inputs, expected, _ = load_fixture("tiny8")
    with torch.no_grad():
        logits = SambaYForCausalLM.from_pretrained(HUB_ID)(inputs["input_ids"]).logits
    assert asked == [HUB_ID]
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("load", [pytest.param("sambay", id="sambay"), pytest.param("hf", id="hf-class")])
def test_hub_id_without_network_says_to_download_and_pass_the_directory(monkeypatch, load, request):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    asked = []

    def offline(repo_id, **kwargs):
        asked.append(repo_id)
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach huggingface.co (offline)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    cls = SambaYForCausalLM if load == "sambay" else request.getfixturevalue("hf").Phi4FlashForCausalLM
    with pytest.raises(FileNotFoundError) as e:
        cls.from_pretrained(HUB_ID)
    assert asked == [HUB_ID]
    msg = str(e.value)
    assert HUB_ID in msg and "offline" in msg
    assert "download" in msg and "pass its directory" in msg


def test_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(FileNotFoundError) as e:
        SambaYForCausalLM.from_pretrained(HUB_ID)
    msg = str(e.value)
    assert HUB_ID in msg and "huggingface_hub" in msg and "pip install" in msg and "pass its directory" in msg
