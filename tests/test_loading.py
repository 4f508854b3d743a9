import json
import shutil

import pytest
import torch
from helpers import FIXTURES, fixture_model, load_fixture
from safetensors.torch import load_file, save_file

from sambay import SambaYForCausalLM
from sambay.loading import CheckpointError


def _copy_fixture(tmp_path, tensors=None):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(FIXTURES / "small16" / "config.json", d / "config.json")
    if tensors is None:
        shutil.copy(FIXTURES / "small16" / "model.safetensors", d / "model.safetensors")
    else:
        save_file(tensors, d / "model.safetensors")
    return d


def _fixture_tensors():
    return load_file(FIXTURES / "small16" / "model.safetensors")


def test_fixture_loads_with_fp32_small_params_in_a_bf16_model():
    model = fixture_model("small16", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert params["model.layers.0.attn.in_proj.weight"].dtype == torch.bfloat16
    for name in ("model.layers.0.attn.A_log", "model.layers.0.attn.D",
                 "model.layers.1.attn.inner_cross_attn.lambda_q1"):
        assert params[name].dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = _fixture_tensors()
    assert torch.equal(params["model.layers.0.attn.A_log"], ref["model.layers.0.attn.A_log"])  # no rounding


def test_one_error_lists_every_missing_unexpected_and_misshaped_key(tmp_path):
    t = _fixture_tensors()
    del t["model.layers.3.mlp.fc2.weight"]
    t["model.layers.2.attn.bogus"] = torch.zeros(3)
    t["model.layers.5.attn.out_proj.bias"] = torch.zeros(65)
    with pytest.raises(CheckpointError) as e:
        SambaYForCausalLM.from_pretrained(_copy_fixture(tmp_path, t))
    msg = str(e.value)
    assert "missing: model.layers.3.mlp.fc2.weight (expected shape [64, 128])" in msg
    assert "unexpected: model.layers.2.attn.bogus (shape [3]" in msg
    assert "wrong shape: model.layers.5.attn.out_proj.bias: expected [64], found [65]" in msg
    assert "3 problem(s)" in msg


def test_a_stored_tied_head_is_accepted(tmp_path):
    t = _fixture_tensors()
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    model = SambaYForCausalLM.from_pretrained(_copy_fixture(tmp_path, t))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_truncated_and_corrupt_files_give_clear_errors(tmp_path):
    d = _copy_fixture(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        SambaYForCausalLM.from_pretrained(d)
    (d / "model.safetensors").write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SambaYForCausalLM.from_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[100:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        SambaYForCausalLM.from_pretrained(d)


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        SambaYForCausalLM.from_pretrained(tmp_path / "does" / "not" / "exist")
    with pytest.raises(FileNotFoundError, match="without config.json"):
        SambaYForCausalLM.from_pretrained(tmp_path)
    shutil.copy(FIXTURES / "small16" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SambaYForCausalLM.from_pretrained(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("shard", [None, 100_000], ids=["single-file", "sharded"])
def test_save_load_round_trip_is_bitwise(tmp_path, shard):
    _, inp, _, _ = load_fixture("small16")
    model = fixture_model("small16")
    model.save_pretrained(tmp_path, **({} if shard is None else {"max_shard_size": shard}))
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard is None:
        # issue 11: the released layout plus generation_config.json and the module config.json's auto_map names
        assert files == ["config.json", "generation_config.json", "model.safetensors", "modeling_sambay.py"]
    else:
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert "lm_head.weight" not in index["weight_map"]
    loaded = SambaYForCausalLM.from_pretrained(tmp_path)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and p1.dtype == p2.dtype and torch.equal(p1, p2), n1
    with torch.no_grad():
        a = model(inp["input_ids"], attention_mask=inp["attention_mask"]).logits
        b = loaded(inp["input_ids"], attention_mask=inp["attention_mask"]).logits
    assert torch.equal(a, b)


def test_bf16_save_round_trip_keeps_dtypes(tmp_path):
    model = fixture_model("tiny8", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = SambaYForCausalLM.from_pretrained(tmp_path)  # dtype from config.json
    assert loaded.dtype == torch.bfloat16
    for (n, p1), (_, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert p1.dtype == p2.dtype and torch.equal(p1, p2), n
