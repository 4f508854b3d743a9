"""Bad checkpoints: one case per kind, each asserting the exception type and the words of its message
(which file or tensor, what was expected, what was found)."""

import contextlib
import json
import os
import re
import shutil
import struct

import pytest
import torch
from helpers import FIXTURES
from safetensors.torch import load_file, save_file

from sambay import SambaYForCausalLM
from sambay.loading import CheckpointError

CONFIG = FIXTURES / "small16" / "config.json"


def _tensors():
    return load_file(FIXTURES / "small16" / "model.safetensors")


def _ckpt(tmp_path, tensors=None, name="ckpt"):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(CONFIG, d / "config.json")
    save_file(_tensors() if tensors is None else tensors, d / "model.safetensors")
    return d


def _sharded(tmp_path, groups: dict[str, list[str]], weight_map=None):
    """Shards by explicit key lists; the index is the true map unless ``weight_map`` is given."""
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(CONFIG, d / "config.json")
    t = _tensors()
    true_map = {}
    for file, keys in groups.items():
        save_file({k: t[k] for k in keys}, d / file)
        true_map.update({k: file for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map or true_map}))
    return d


def _raw_file(path, header: dict, data: bytes, raw_header: bytes | None = None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _raw_ckpt(tmp_path, header, data, raw_header=None):
    d = tmp_path / "raw"
    d.mkdir()
    shutil.copy(CONFIG, d / "config.json")
    _raw_file(d / "model.safetensors", header, data, raw_header)
    return d


def _halves():
    keys = sorted(_tensors())
    return keys[: len(keys) // 2], keys[len(keys) // 2:]


# ---- stored dtypes --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, code", [(torch.int64, "I64"), (torch.int32, "I32"), (torch.bool, "BOOL"),
                                         (torch.uint8, "U8"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_non_float_tensors_are_refused_by_name(tmp_path, dtype, code):
    t = _tensors()
    t["model.layers.0.attn.D"] = t["model.layers.0.attn.D"].to(dtype)
    with pytest.raises(CheckpointError) as e:
        SambaYForCausalLM.from_pretrained(_ckpt(tmp_path, t))
    msg = str(e.value)
    assert f"tensor model.layers.0.attn.D is stored as {code}; expected a float dtype (F64, F32, F16, BF16)" in msg
    assert "model.safetensors" in msg


def test_float_dtypes_cast_exactly_where_they_can(tmp_path):
    t = _tensors()
    t = {k: v.double() if i % 2 else v.half() for i, (k, v) in enumerate(t.items())}  # mixed stored dtypes
    model = SambaYForCausalLM.from_pretrained(_ckpt(tmp_path, t), dtype=torch.float32)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, t[name].float()), name


# ---- header fields: each malformed field named by file, tensor and field ------------------------------------
def _f32(n, a):
    return {"dtype": "F32", "shape": [n], "data_offsets": [a, a + 4 * n]}


def _a(**fields):
    """Tensor ``a``: two F32 values at [0, 8], with ``fields`` replaced."""
    return {"a": {**_f32(2, 0), **fields}}


@pytest.mark.parametrize("header, data, words", [
    ({"a": _f32(2, 0), "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8,
     "tensor b: data_offsets [4, 8] overlap tensor a (which ends at 8)"),
    ({"a": _f32(1, 0), "b": _f32(1, 8)}, 12, "tensor b: data_offsets [8, 12] leave bytes 4..8 after tensor a unused"),
    ({"a": _f32(1, 4)}, 8, "tensor a: data_offsets [4, 8] leave bytes 0..4 at the start of the data unused"),
    (_a(shape=[0], data_offsets=[8, 0]), 8, "tensor a: data_offsets [8, 0]: expected [begin, end], two integers "
                                            "with 0 <= begin <= end"),
    (_a(data_offsets=[0]), 8, "tensor a: data_offsets [0]: expected [begin, end]"),
    (_a(data_offsets=[-8, 0]), 8, "tensor a: data_offsets [-8, 0]: expected [begin, end]"),
    ({"a": _f32(1, 0)}, 12, "8 byte(s) after the last tensor's data (the tensors end at 4, the data region has 12)"),
    (_a(shape=[3]), 8, "tensor a: shape [3] of F32 needs 12 bytes, but data_offsets [0, 8] span 8"),
    (_a(dtype="F16"), 8, "tensor a: shape [2] of F16 needs 4 bytes, but data_offsets [0, 8] span 8"),
    (_a(dtype="F33"), 8, "tensor a: dtype 'F33' is not a safetensors dtype; expected one of BOOL, U8"),
    (_a(dtype=32), 8, "tensor a: dtype 32 is not a safetensors dtype"),
    (_a(dtype="F8_E4M3"), 8, "tensor a is stored as F8_E4M3; expected a float dtype (F64, F32, F16, BF16)"),
    (_a(dtype="F4"), 8, "tensor a is stored as F4; expected a float dtype (F64, F32, F16, BF16)"),
    (_a(shape=[-2]), 8, "tensor a: shape [-2]: expected a list of non-negative integers"),
    (_a(shape=[2.0]), 8, "tensor a: shape [2.0]: expected a list of non-negative integers"),
    (_a(shape=[True, 2]), 8, "tensor a: shape [True, 2]: expected a list of non-negative integers"),
    (_a(shape=2), 8, "tensor a: shape 2: expected a list of non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [2]}}, 8, "tensor a: missing field(s) ['data_offsets']"),
    ({"a": [1, 2]}, 8, "tensor a: expected an object with dtype, shape and data_offsets, found [1, 2]"),
    ({"__metadata__": {"format": 1}, **_a()}, 8, "__metadata__: expected an object of strings, found {'format': 1}"),
], ids=["overlap", "gap", "gap-at-start", "reversed", "one-offset", "negative-offset", "trailing-bytes",
        "shape-vs-bytes", "dtype-vs-bytes", "unknown-dtype", "dtype-not-a-string", "unsupported-fp8", "unsupported-fp4",
        "negative-shape", "float-shape", "bool-shape", "shape-not-a-list", "no-offsets", "entry-not-an-object",
        "metadata"])
def test_malformed_header_fields_are_named(tmp_path, header, data, words):
    d = _raw_ckpt(tmp_path, header, b"\0" * data)
    with pytest.raises(CheckpointError) as e:
        SambaYForCausalLM.from_pretrained(d)
    assert str(e.value).startswith(f"{d / 'model.safetensors'}: ") and words in str(e.value)


def test_a_header_the_official_parser_accepts_passes_the_field_checks(tmp_path):
    """The field checks are no stricter than the format: zero-size tensors sharing an offset, unknown extra fields,
    string metadata and trailing spaces after the JSON all load."""
    from sambay.checkpoint import read_header

    header = {"__metadata__": {"format": "pt"}, "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
              "a": {**_f32(2, 0), "note": "ignored"}, "z": {"dtype": "BF16", "shape": [0], "data_offsets": [8, 8]}}
    path = tmp_path / "ok.safetensors"
    _raw_file(path, header, b"\0" * 8, raw_header=json.dumps(header).encode() + b"    ")
    parsed, start = read_header(path)
    assert sorted(parsed) == ["a", "e", "z"] and start == 8 + len(json.dumps(header)) + 4


def test_offsets_beyond_the_file_say_truncated(tmp_path):
    d = _raw_ckpt(tmp_path, {"a": _f32(4, 0)}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"truncated: the header describes \d+ bytes, the file has \d+"):
        SambaYForCausalLM.from_pretrained(d)


def test_a_key_twice_in_one_header_is_refused(tmp_path):
    raw = b'{"a":' + json.dumps(_f32(1, 0)).encode() + b',"a":' + json.dumps(_f32(1, 4)).encode() + b"}"
    d = _raw_ckpt(tmp_path, None, b"\0" * 8, raw_header=raw)
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header: the names \['a'\] appear more than once"):
        SambaYForCausalLM.from_pretrained(d)


def test_a_header_that_is_not_an_object(tmp_path):
    d = _raw_ckpt(tmp_path, None, b"", raw_header=b"[1, 2]  ")
    with pytest.raises(CheckpointError, match="corrupt safetensors header .expected a JSON object, found list"):
        SambaYForCausalLM.from_pretrained(d)


# ---- shards and the index --------------------------------------------------------------------------------
def test_a_key_in_two_shards_is_refused(tmp_path):
    a, b = _halves()
    d = _sharded(tmp_path, {"s1.safetensors": a, "s2.safetensors": b + a[:1]},
                 weight_map={**{k: "s1.safetensors" for k in a}, **{k: "s2.safetensors" for k in b}})
    with pytest.raises(CheckpointError) as e:
        SambaYForCausalLM.from_pretrained(d)
    assert f"{a[0]} is stored in both s1.safetensors and s2.safetensors" in str(e.value)
    assert "expected each in exactly one" in str(e.value)


@pytest.mark.parametrize("index_text, words", [
    ("{not json", "not a valid safetensors index (not JSON"),
    ("[1, 2]", "expected an object with a 'weight_map', found a JSON list"),
    ('{"metadata": {}}', "expected an object with a 'weight_map', found keys ['metadata']"),
    ('{"weight_map": ["s1.safetensors"]}', "weight_map: expected a non-empty object of tensor name -> shard file"),
    ('{"weight_map": {}}', "weight_map: expected a non-empty object"),
    ('{"weight_map": {"lm_head.weight": 3}}', "weight_map['lm_head.weight']: expected the file name of a shard in "
                                              "the same directory, found 3"),
    ('{"weight_map": {"x": "../model.safetensors"}}', "found '../model.safetensors'"),
    ('{"weight_map": {"x": "sub/s1.safetensors"}}', "found 'sub/s1.safetensors'"),
])
def test_malformed_indexes(tmp_path, index_text, words):
    a, b = _halves()
    d = _sharded(tmp_path, {"s1.safetensors": a, "s2.safetensors": b})
    (d / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(CheckpointError) as e:
        SambaYForCausalLM.from_pretrained(d)
    assert str(d / "model.safetensors.index.json") in str(e.value) and words in str(e.value)


def test_an_index_naming_a_missing_shard(tmp_path):
    a, b = _halves()
    d = _sharded(tmp_path, {"s1.safetensors": a, "s2.safetensors": b})
    (d / "s2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"index.json: the index names shard\(s\) that do not exist in .*"
                                                r"\['s2.safetensors'\]"):
        SambaYForCausalLM.from_pretrained(d)


def test_an_index_that_disagrees_with_the_shards(tmp_path):
    a, b = _halves()
    wrong = {**{k: "s1.safetensors" for k in a + b[:1]}, **{k: "s2.safetensors" for k in b[1:]}}
    d = _sharded(tmp_path, {"s1.safetensors": a, "s2.safetensors": b}, weight_map=wrong)
    with pytest.raises(CheckpointError) as e:
        SambaYForCausalLM.from_pretrained(d)
    msg = str(e.value)
    assert "weight_map does not match the shards (2 problem(s))" in msg
    assert f"{b[0]} is stored in s2.safetensors, but the index names s1.safetensors" in msg
    assert f"{b[0]}: the index names s1.safetensors, which does not hold it" in msg
    del wrong[b[0]]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wrong}))
    with pytest.raises(CheckpointError, match=f"{b[0]} is stored in s2.safetensors, but the index does not list it"):
        SambaYForCausalLM.from_pretrained(d)


def test_both_layouts_at_once_are_refused(tmp_path):
    a, b = _halves()
    d = _sharded(tmp_path, {"s1.safetensors": a, "s2.safetensors": b})
    save_file(_tensors(), d / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds both model.safetensors and model.safetensors.index.json; "
                                              "expected one layout"):
        SambaYForCausalLM.from_pretrained(d)


# ---- values ----------------------------------------------------------------------------------------------
def test_a_stored_head_that_differs_from_the_tied_embedding(tmp_path):
    t = _tensors()
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    t["lm_head.weight"][3, 5] += 0.5
    with pytest.raises(CheckpointError) as e:
        SambaYForCausalLM.from_pretrained(_ckpt(tmp_path, t))
    msg = str(e.value)
    assert "lm_head.weight differs from model.embed_tokens.weight (max |difference| 0.5)" in msg
    assert "tie_word_embeddings=true" in msg and "expected an identical copy or none" in msg


@pytest.mark.parametrize("value, words", [(float("nan"), "1 NaN and 0 inf value(s)"),
                                          (float("-inf"), "0 NaN and 1 inf value(s)")])
def test_non_finite_weights_are_reported_by_name(tmp_path, value, words):
    t = _tensors()
    t["model.layers.4.mlp.fc2.weight"][7, 3] = value
    t["model.final_layernorm.bias"][0] = value
    d = _ckpt(tmp_path, t)
    with pytest.raises(CheckpointError) as e:
        SambaYForCausalLM.from_pretrained(d)
    msg = str(e.value)
    assert "2 tensor(s) hold non-finite values" in msg and "check_finite=False" in msg
    assert f"model.layers.4.mlp.fc2.weight (in model.safetensors): {words}" in msg
    assert f"model.final_layernorm.bias (in model.safetensors): {words}" in msg
    from sambay.loading import from_pretrained

    model = from_pretrained(d, SambaYForCausalLM, check_finite=False)  # an explicit opt-out loads it as stored
    torch.testing.assert_close(model.model.final_layernorm.bias, t["model.final_layernorm.bias"], rtol=0, atol=0,
                               equal_nan=True)


def test_a_cast_that_overflows_to_inf_is_reported(tmp_path):
    t = _tensors()
    t["model.layers.4.mlp.fc2.weight"][0, 0] = 1e6  # finite in fp32, beyond float16's 65504
    with pytest.raises(CheckpointError) as e:
        SambaYForCausalLM.from_pretrained(_ckpt(tmp_path, t), dtype=torch.float16)
    assert ("model.layers.4.mlp.fc2.weight (in model.safetensors): 1 value(s) became inf when cast from "
            "torch.float32 to torch.float16 (beyond torch.float16's range, max |x| = 1e+06)") in str(e.value)


@pytest.mark.slow
def test_the_nan_screen_finds_one_value_in_a_large_half_tensor():
    from sambay.checkpoint import is_finite as _is_finite

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = torch.randn(3_000_001).to(dtype)
        assert _is_finite(t)
        for value in (float("nan"), float("inf"), float("-inf")):
            u = t.clone()
            u[1_234_567] = value
            assert not _is_finite(u), (dtype, value)
        both = t.clone()
        both[0], both[1] = float("inf"), float("-inf")  # inf + -inf = NaN: still caught
        assert not _is_finite(both)
    big = torch.full((100_000,), 60000.0, dtype=torch.float16)  # the sum overflows; every value is finite
    assert _is_finite(big)


# ---- arguments and paths ---------------------------------------------------------------------------------
def test_a_missing_local_directory_is_not_a_hub_lookup(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    (tmp_path / "ckpts").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint directory: ckpts/model \(the nearest existing "
                                                r"directory is .*ckpts\)"):
        SambaYForCausalLM.from_pretrained("ckpts/model")
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory: ./model"):
        SambaYForCausalLM.from_pretrained("./model")


def test_a_hub_id_that_cannot_be_fetched_says_both(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        SambaYForCausalLM.from_pretrained("some-org/some-model")
    assert "'some-org/some-model' is not a local directory, and fetching it from the Hugging Face hub failed " \
           "(OSError: offline)" in str(e.value)


def test_a_file_or_a_non_path_instead_of_a_directory(tmp_path):
    with pytest.raises(NotADirectoryError, match="config.json is a file; expected a checkpoint directory"):
        SambaYForCausalLM.from_pretrained(CONFIG)
    with pytest.raises(TypeError, match="path: expected a checkpoint directory .str or os.PathLike. or a hub id, "
                                        "got int"):
        SambaYForCausalLM.from_pretrained(3)


# ---- paths that are there but cannot be read: named, never reported as missing ----------------------------
def _loop(path):
    """``path`` becomes a symlink loop (it points to itself)."""
    path.unlink(missing_ok=True)
    path.symlink_to(path.name)


@pytest.mark.parametrize("case, kind, words", [
    ("directory-loop", OSError, "the checkpoint directory {d} is a symbolic link loop"),
    ("weights-loop", OSError, "the weights file {d}/model.safetensors is a symbolic link loop"),
    ("weights-dangling", FileNotFoundError,
     "the weights file {d}/model.safetensors is a symbolic link to gone.safetensors, which does not exist"),
    ("weights-directory", IsADirectoryError, "the weights file {d}/model.safetensors is a directory; expected a file"),
    ("weights-fifo", OSError, "the weights file {d}/model.safetensors is not a regular file (mode prw"),
    ("config-loop", OSError, "the checkpoint's config {d}/config.json is a symbolic link loop"),
    ("index-loop", OSError, "the shard index {d}/model.safetensors.index.json is a symbolic link loop"),
    ("shard-loop", OSError, "the shard {d}/s2.safetensors is a symbolic link loop"),
    ("through-a-file", NotADirectoryError, "the checkpoint directory {d}/config.json/sub cannot be reached: a "
                                           "component of the path is a file"),
])
def test_unreadable_paths_are_named_not_reported_missing(tmp_path, case, kind, words):
    d = _ckpt(tmp_path)
    target = {"directory-loop": tmp_path / "looped", "through-a-file": d / "config.json" / "sub"}.get(case)
    if case == "directory-loop":
        _loop(target)
        d = target
    elif case.startswith("weights-"):
        w = d / "model.safetensors"
        w.unlink()
        {"loop": lambda: _loop(w), "dangling": lambda: w.symlink_to("gone.safetensors"), "directory": w.mkdir,
         "fifo": lambda: os.mkfifo(w)}[case.split("-")[1]]()
    elif case == "config-loop":
        _loop(d / "config.json")
    elif case in ("index-loop", "shard-loop"):
        a, b = _halves()
        d = _sharded(tmp_path, {"s1.safetensors": a, "s2.safetensors": b})
        _loop(d / ("model.safetensors.index.json" if case == "index-loop" else "s2.safetensors"))
    with pytest.raises(kind) as e:
        SambaYForCausalLM.from_pretrained(target or d)
    assert words.format(d=d) in str(e.value)
    assert "no such" not in str(e.value) and "no model.safetensors" not in str(e.value)


def test_a_generation_config_that_cannot_be_read_is_not_skipped(tmp_path):
    from sambay.lm import read_generation_config

    _loop(tmp_path / "generation_config.json")
    with pytest.raises(OSError, match="generation config .*generation_config.json is a symbolic link loop"):
        read_generation_config(tmp_path)
    assert read_generation_config(tmp_path / "elsewhere") == {}  # none at all: the defaults


def test_saving_into_a_symlink_loop_names_it(tmp_path):
    from helpers import random_model

    _loop(tmp_path / "out")
    with pytest.raises(OSError, match="directory: .*out is a symbolic link loop"):
        random_model().save_pretrained(tmp_path / "out")


@contextlib.contextmanager
def _unprivileged():
    """Run the block as uid/gid 65534 when the tests run as root (root may read anything); restored after."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.mark.parametrize("what, mode, words", [
    ("model.safetensors", 0o600, r"the weights file {d}/model.safetensors cannot be read: permission denied \(mode "
                                 r"-rw-------, owner uid \d+; expected read permission\)"),
    ("config.json", 0o200, r"the checkpoint's config {d}/config.json cannot be read: permission denied \(mode "
                           r"--w-------"),
    (".", 0o744, r"the checkpoint directory {d} cannot be read: permission denied \(mode drwxr--r--, owner uid "
                 r"\d+; expected read and search permission\)"),
    ("sub", 0o700, r"the checkpoint directory {d} cannot be read: permission denied \(to search a "
                   r"directory above it\)"),
])
def test_paths_without_permission_are_named(tmp_path, what, mode, words):
    opened = [p for p in (tmp_path, *tmp_path.parents)  # pytest's temporary directories are private to their owner
              if str(p).startswith("/tmp/") and p.owner() == tmp_path.owner() and p.stat().st_mode & 0o005 != 0o005]
    modes = {p: p.stat().st_mode for p in opened}
    base = tmp_path / "sub" if what == "sub" else tmp_path
    try:
        for p in opened:
            p.chmod(p.stat().st_mode | 0o005)
        base.mkdir(exist_ok=True)
        base.chmod(0o755)
        d = _ckpt(base)
        (base if what == "sub" else d / what).chmod(mode)
        with _unprivileged(), pytest.raises(PermissionError) as e:
            SambaYForCausalLM.from_pretrained(d)
    finally:
        base.chmod(0o755)
        for p, m in modes.items():
            p.chmod(m)
    assert re.search(words.format(d=re.escape(str(d))), str(e.value)), str(e.value)


@pytest.mark.parametrize("dtype, kind, words", [
    ("bf16", ValueError, "dtype: expected one of float32, bfloat16, float16, float64"),
    (torch.int8, ValueError, "dtype: expected a float dtype the model computes in"),
    (16, TypeError, "dtype: expected a torch float dtype, its name, or None, got int"),
])
def test_bad_dtype_arguments(dtype, kind, words):
    with pytest.raises(kind, match=words):
        SambaYForCausalLM.from_pretrained(FIXTURES / "tiny8", dtype=dtype)


def test_dtype_names_are_accepted():
    assert SambaYForCausalLM.from_pretrained(FIXTURES / "tiny8", dtype="bfloat16").dtype == torch.bfloat16


def test_bad_device_arguments():
    with pytest.raises(ValueError, match="device: expected a torch device such as 'cpu' or 'cuda:0', got 'gpu0'"):
        SambaYForCausalLM.from_pretrained(FIXTURES / "tiny8", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' asked for, but CUDA is not available here"):
            SambaYForCausalLM.from_pretrained(FIXTURES / "tiny8", device="cuda")


def test_an_invalid_config_in_a_checkpoint_names_the_file(tmp_path):
    d = _ckpt(tmp_path)
    cfg = json.loads(CONFIG.read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, layer_norm_eps=-1.0)))
    with pytest.raises(ValueError, match="layer_norm_eps: expected a finite number > 0, got -1.0"):
        SambaYForCausalLM.from_pretrained(d)
    (d / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=f"{d / 'config.json'}: expected a JSON object"):
        SambaYForCausalLM.from_pretrained(d)


def test_check_finite_is_reachable_from_the_model_class(tmp_path):
    """SambaYForCausalLM.from_pretrained/save_pretrained pass check_finite through to the loader and saver."""
    from helpers import random_model

    model = random_model()
    with torch.no_grad():
        model.model.layers[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc1.weight"):
        model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b", check_finite=False)
    with pytest.raises(ValueError, match="fc1.weight"):
        SambaYForCausalLM.from_pretrained(tmp_path / "b")
    loaded = SambaYForCausalLM.from_pretrained(tmp_path / "b", check_finite=False)
    assert loaded.model.layers[0].mlp.fc1.weight.isnan().any()
