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


# ---- every field's domain: one case per kind of bad value (type and message words) ------------------------
@pytest.mark.parametrize("field, value, kind, words", [
    ("vocab_size", 0, ValueError, "vocab_size: expected a positive integer, got 0"),
    ("hidden_size", "64", TypeError, "hidden_size: expected a positive integer, got '64' (str)"),
    ("intermediate_size", -1, ValueError, "intermediate_size: expected a positive integer, got -1"),
    ("num_attention_heads", 8.0, TypeError, "num_attention_heads: expected a positive integer, got 8.0 (float)"),
    ("num_key_value_heads", True, TypeError, "num_key_value_heads: expected a positive integer, got True (bool)"),
    ("mamba_d_state", 0, ValueError, "mamba_d_state: expected a positive integer"),
    ("mamba_d_conv", 0, ValueError, "mamba_d_conv: expected a positive integer"),
    ("mamba_expand", None, TypeError, "mamba_expand: expected a positive integer, got None"),
    ("max_position_embeddings", 0, ValueError, "max_position_embeddings: expected a positive integer"),
    ("mb_per_layer", 0, ValueError, "mb_per_layer: expected a positive integer"),
    ("num_hidden_layers", "16", TypeError, "num_hidden_layers: expected a multiple of 4"),
    ("sliding_window", 2.5, TypeError, "sliding_window: expected an integer >= 1"),
    ("mamba_dt_rank", 0, ValueError, "mamba_dt_rank: expected 'auto' or a positive integer, got 0"),
    ("mamba_dt_rank", "big", TypeError, "mamba_dt_rank: expected 'auto' or a positive integer, got 'big'"),
    ("hidden_act", "gelu", ValueError, "hidden_act: expected 'silu'"),
    ("layer_norm_eps", 0.0, ValueError, "layer_norm_eps: expected a finite number > 0, got 0.0"),
    ("layer_norm_eps", -1e-5, ValueError, "layer_norm_eps: expected a finite number > 0"),
    ("layer_norm_eps", float("nan"), ValueError, "layer_norm_eps: expected a finite number > 0, got nan"),
    ("layer_norm_eps", "1e-5", TypeError, "layer_norm_eps: expected a finite number > 0, got '1e-5' (str)"),
    ("rope_theta", 0, ValueError, "rope_theta: expected a finite number > 0"),
    ("rope_theta", float("inf"), ValueError, "rope_theta: expected a finite number > 0, got inf"),
    ("initializer_range", -0.02, ValueError, "initializer_range: expected a finite number >= 0"),
    ("resid_pdrop", 1.0, ValueError, "resid_pdrop: expected a probability in [0, 1), got 1.0"),
    ("embd_pdrop", -0.1, ValueError, "embd_pdrop: expected a probability in [0, 1), got -0.1"),
    ("attention_dropout", "0.1", TypeError, "attention_dropout: expected a probability in [0, 1)"),
    ("tie_word_embeddings", "true", TypeError, "tie_word_embeddings: expected true or false, got 'true' (str)"),
    ("use_cache", 1, TypeError, "use_cache: expected true or false, got 1 (int)"),
    ("mamba_conv_bias", None, TypeError, "mamba_conv_bias: expected true or false"),
    ("mamba_proj_bias", "no", TypeError, "mamba_proj_bias: expected true or false"),
    ("pad_token_id", -1, ValueError, "pad_token_id: expected a token id in [0, vocab_size=256) or null, got -1"),
    ("bos_token_id", 256, ValueError, "bos_token_id: expected a token id in [0, vocab_size=256) or null, got 256"),
    ("eos_token_id", "2", TypeError, "eos_token_id: expected a token id in [0, vocab_size=256)"),
    ("eos_token_id", [2, 300], ValueError, "eos_token_id[1]: expected a token id in [0, vocab_size=256), got 300"),
    ("eos_token_id", [], ValueError, "eos_token_id: expected an id, a non-empty list of ids, or null, got []"),
    ("torch_dtype", "bf16", ValueError, "torch_dtype: expected one of float32, bfloat16, float16, float64 or null"),
    ("torch_dtype", 16, TypeError, "torch_dtype: expected one of float32"),
    ("mlp_bias", True, ValueError, "mlp_bias: expected False (SambaY has no such variant), got True"),
    ("lm_head_bias", True, ValueError, "lm_head_bias: expected False"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, ValueError, "rope_scaling: expected None"),
    ("quantization_config", {"quant_method": "bitsandbytes"}, ValueError,
     "quantization_config: quant_method 'bitsandbytes' is not a format sambay reads; it handles quant_method 'sambay'"),
    ("head_dim", 128, ValueError, "head_dim: the config states 128, but the other fields give 8"),
    ("dt_rank", 3, ValueError, "dt_rank: the config states 3, but the other fields give 4"),
    ("layer_types", "mamba", TypeError, "layer_types: expected a list of 16 layer type names, got 'mamba' (str)"),
    ("layer_types", ["mamba"] * 15, ValueError, "layer_types: expected 16 entries (num_hidden_layers), got 15"),
    ("sliding_window", [None, "x"] + [None] * 14, TypeError, "sliding_window[1]: expected an integer window size"),
    ("sliding_window", [None, 16], ValueError, "sliding_window: expected an int or a list of 16 entries, got a list"),
    ("extra", [1], TypeError, "extra: expected a dict"),
])
def test_every_field_domain_is_checked(field, value, kind, words):
    d = json.loads((FIXTURES / "small16" / "config.json").read_text())
    d[field] = value
    with pytest.raises(kind) as e:
        SambaYConfig.from_dict(d)
    assert words in str(e.value)
    assert type(e.value) is kind


def test_the_constructor_validates_too():
    with pytest.raises(ValueError, match="layer_norm_eps: expected a finite number > 0"):
        SambaYConfig(layer_norm_eps=0.0)
    with pytest.raises(TypeError, match=r"vocab_size: expected a positive integer, got '1' \(str\)"):
        SambaYConfig(vocab_size="1")


def test_dtype_alias_of_transformers_5_and_its_conflict():
    d = json.loads((FIXTURES / "small16" / "config.json").read_text())
    del d["torch_dtype"]
    assert SambaYConfig.from_dict(dict(d, dtype="bfloat16")).torch_dtype == "bfloat16"
    assert SambaYConfig.from_dict(dict(d, dtype="bfloat16", torch_dtype="torch.bfloat16")).torch_dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"dtype='float16' and torch_dtype='float32' disagree"):
        SambaYConfig.from_dict(dict(d, dtype="float16", torch_dtype="float32"))


def test_a_json_that_is_not_an_object_or_not_json_or_not_text(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object of config keys, found a JSON array"):
        SambaYConfig.from_pretrained(tmp_path)
    p.write_text('"phi4flash"')
    with pytest.raises(ValueError, match="found a JSON string"):
        SambaYConfig.from_json(p)
    p.write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        SambaYConfig.from_json(p)
    p.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="config.json: not a UTF-8 text file"):
        SambaYConfig.from_json(p)
    with pytest.raises(TypeError, match="SambaYConfig.from_dict: expected a dict of config.json keys, got list"):
        SambaYConfig.from_dict([("hidden_size", 64)])


def test_an_unknown_key_warns_with_the_close_field_name(tmp_path):
    d = json.loads((FIXTURES / "small16" / "config.json").read_text())
    d["sliding_windw"] = 32
    d["hiden_size"] = 32
    d["my_note"] = "x"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning) as record:
        c = SambaYConfig.from_pretrained(tmp_path)
    (msg,) = [str(w.message) for w in record]
    assert str(tmp_path / "config.json") in msg  # names the file
    assert "'sliding_windw' (did you mean 'sliding_window'?)" in msg
    assert "'hiden_size' (did you mean 'hidden_size'?)" in msg
    assert "'my_note'" in msg and "'my_note' (did" not in msg
    assert c.sliding_window == 16 and c.extra["sliding_windw"] == 32  # not applied, kept for the round trip


def test_released_and_transformers_written_configs_load_without_a_warning(tmp_path):
    import warnings

    paths = sorted(FIXTURES.glob("*/config.json")) + sorted(CONFIGS.glob("*.json"))
    assert len(paths) >= 6
    d = json.loads(paths[0].read_text())
    # keys transformers 5 and older 4.x write into config.json
    d.update(dtype=d["torch_dtype"], _name_or_path="x", output_attentions=False, return_dict=True, id2label={},
             label2id={}, problem_type=None, is_encoder_decoder=False, chunk_size_feed_forward=0, max_length=20,
             mlp_bias=False, lm_head_bias=False, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for p in [*paths, tmp_path / "config.json"]:
            SambaYConfig.from_pretrained(p)
