import json

import pytest
from helpers import CONFIGS, FIXTURES

from sambay import SambaYConfig


def test_released_config_roles_and_derived_sizes():
    c = SambaYConfig.from_pretrained(FIXTURES / "phi4-mini-flash-reasoning")
    assert c.layer_types[:16] == ("mamba", "sliding_attention") * 8
    assert c.layer_types[16:18] == ("mamba", "full_attention")
    assert c.layer_types[18:] == ("gmu", "cross_attention") * 7
    assert (c.memory_layer, c.kv_layer, c.first_cross_layer) == (16, 17, 18)
    assert (c.head_dim, c.d_inner, c.dt_rank, c.sliding_window) == (64, 5120, 160, 512)
    assert (c.mamba_d_state, c.mamba_d_conv) == (16, 4)  # absent keys take the class defaults
    assert round(c.lambda_init(1), 6) == 0.355509 and round(c.lambda_init(31), 6) == 0.799945


def test_from_pretrained_takes_a_directory_or_a_file(tmp_path):
    a = SambaYConfig.from_pretrained(FIXTURES / "tiny8")
    b = SambaYConfig.from_pretrained(FIXTURES / "tiny8" / "config.json")
    assert a == b
    with pytest.raises(FileNotFoundError, match="without config.json"):
        SambaYConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such"):
        SambaYConfig.from_pretrained(tmp_path / "nope")


def test_round_trip_keeps_unknown_keys(tmp_path):
    c = SambaYConfig.from_pretrained(CONFIGS / "phi4-mini-flash-reasoning.json")
    c.to_json(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["auto_map"]["AutoConfig"] == "configuration_phi4flash.Phi4FlashConfig"
    assert d["model_type"] == "phi4flash"
    assert SambaYConfig.from_pretrained(tmp_path) == c


def test_per_layer_sliding_window_list_and_layer_types():
    base = json.loads((FIXTURES / "small16" / "config.json").read_text())
    n = base["num_hidden_layers"]
    listed = dict(base, sliding_window=[16 if (i < n // 2 and i % 2) else None for i in range(n)])
    assert SambaYConfig.from_dict(listed).sliding_window == 16
    ref = SambaYConfig.from_dict(base)
    hf_types = ["sliding_attention" if t == "sliding_attention" else "full_attention" for t in ref.layer_types]
    assert SambaYConfig.from_dict(dict(base, layer_types=hf_types)).layer_types == ref.layer_types
    assert SambaYConfig.from_dict(dict(base, layer_types=list(ref.layer_types))).layer_types == ref.layer_types
    wrong = list(ref.layer_types)
    wrong[1] = "full_attention"
    with pytest.raises(ValueError, match=r"layer_types\[1\]: expected 'sliding_attention'"):
        SambaYConfig.from_dict(dict(base, layer_types=wrong))
    with pytest.raises(ValueError, match="one window size"):
        SambaYConfig.from_dict(dict(base, sliding_window=[4 if i == 1 else (8 if i == 3 else None) for i in range(n)]))


@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", 7, "num_attention_heads: expected an even number"),
    ("num_key_value_heads", 3, "num_key_value_heads: expected an even number"),
    ("num_key_value_heads", 6, "num_key_value_heads: expected a divisor of num_attention_heads=8"),
    ("num_hidden_layers", 6, "num_hidden_layers: expected a multiple of 4"),
    ("num_hidden_layers", 0, "num_hidden_layers: expected a multiple of 4"),
    ("sliding_window", 0, "sliding_window: expected an integer >= 1"),
    ("hidden_size", 60, "hidden_size: expected a multiple of num_attention_heads=8"),
    ("model_type", "llama", "model_type: expected 'phi4flash', got 'llama'"),
    ("mb_per_layer", 3, "mb_per_layer"),
])
def test_invalid_configs_name_the_field(field, value, message):
    d = json.loads((FIXTURES / "small16" / "config.json").read_text())
    d[field] = value
    with pytest.raises(ValueError, match=message) as e:
        SambaYConfig.from_dict(d)
    assert repr(value) in str(e.value)
