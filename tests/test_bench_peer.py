"""The llama.cpp peer (sambay.bench.llamacpp, sambay.bench.peer) and the C++ read (sambay.bench.bandwidth).

The GGUF writer and the sequence-state writer are checked without llama.cpp (gguf is a test dependency); against
llama.cpp itself (a file it saved after a real prefill, the harness end to end on tiny shapes) when llama-cpp-python
is installed: it is not in CI (its build from source takes minutes on 2 cores).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from sambay.bench.llamacpp import Phi3Shape, read_seq_state, write_phi3_gguf, write_seq_state

gguf = pytest.importorskip("gguf")

# k-quants need rows that are multiples of 256; two layers, GQA 4/2, head dim 64 (rope dims int(0.75*256)//4 = 48)
TINY = Phi3Shape(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, max_position_embeddings=8192, original_max_position_embeddings=1024)


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (not in CI: minutes to build)")


def test_gguf_has_phi3_layout_as_the_converter_writes_it(tmp_path):
    path = write_phi3_gguf(tmp_path / "m.gguf", TINY)
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.architecture"] == "phi3"
    assert kv["tokenizer.ggml.model"] == "none" and kv["phi3.vocab_size"] == TINY.vocab_size
    assert kv["phi3.rope.dimension_count"] == 48 == TINY.rope_dims
    assert kv["phi3.attention.head_count"] == 4 and kv["phi3.attention.head_count_kv"] == 2
    assert kv["phi3.embedding_length"] == 256 and kv["phi3.feed_forward_length"] == 512
    assert kv["phi3.block_count"] == 2 and kv["phi3.context_length"] == 8192
    assert kv["phi3.rope.scaling.original_context_length"] == 1024
    assert kv["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(8) / math.log(1024)), rel=1e-6)
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    t = {x.name: x for x in r.tensors}
    assert "output.weight" not in t  # tied: llama.cpp reads token_embd as the output matrix
    kvd = 2 * 64
    # GGUF shapes are ggml's (in, out): fused q|k|v rows, fused gate|up rows
    assert list(t["blk.0.attn_qkv.weight"].shape) == [256, 256 + 2 * kvd]
    assert list(t["blk.1.ffn_up.weight"].shape) == [256, 2 * 512]
    assert list(t["blk.1.ffn_down.weight"].shape) == [512, 256]
    assert list(t["token_embd.weight"].shape) == [256, 512]
    assert list(t["rope_factors_long.weight"].shape) == [24] == list(t["rope_factors_short.weight"].shape)
    assert t["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    n = sum(int(np.prod(x.shape)) for x in r.tensors if not x.name.startswith("rope_factors"))
    assert n == TINY.num_params()
    w = np.asarray(t["blk.0.ffn_down.weight"].data).view(np.uint16).astype(np.uint32) << 16
    vals = w.view(np.float32)
    assert np.isfinite(vals).all() and 0.015 < vals.std() < 0.025  # N(0, 0.02) in bf16


def test_phi4_mini_shape():
    s = Phi3Shape()
    assert s.rope_dims == 96 and s.head_dim == 128 and s.kv_row_bytes == 8 * 128 * 2
    assert round(s.num_params() / 1e7) == 384  # 3.84B, tied


def test_seq_state_round_trip(tmp_path):
    a = write_seq_state(tmp_path / "a.ggsq", TINY, 5, seed=3)
    st = read_seq_state(a)
    assert list(st["positions"]) == [0, 1, 2, 3, 4] and set(st["seq_ids"]) == {0}
    assert st["row"] == TINY.kv_row_bytes and len(st["k"]) == len(st["v"]) == 2
    assert all(len(x) == 5 * TINY.kv_row_bytes for x in st["k"] + st["v"])
    assert np.isfinite(np.frombuffer(st["k"][1], np.float16)).all()
    b = write_seq_state(tmp_path / "b.ggsq", TINY, 5, tokens=st["tokens"], k=st["k"], v=st["v"])
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match=f"expected {5 * TINY.kv_row_bytes} bytes, got 1"):
        write_seq_state(tmp_path / "c.ggsq", TINY, 5, k=[b"\0"] * 2, v=st["v"])


def test_stream_read_bandwidth_runs():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    from sambay.bench.bandwidth import describe, read_bandwidths

    bw = read_bandwidths(mib=16, threads=2, repeats=3)
    assert bw["stream"]["bytes"] == 16 * 2**20 and len(bw["stream"]["samples_s"]) == 3
    assert bw["stream"]["gb_per_s"] > 0 and bw["sum"]["gb_per_s"] > 0
    assert bw["floor_gb_per_s"] == max(bw["stream"]["gb_per_s"], bw["sum"]["gb_per_s"])
    assert "C++ stream read" in describe(bw)


# ------------------------------------------------------------------------------------------ against llama.cpp
def _decode(lc, ctx, batch, tokens, pos0):
    batch.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = t, pos0 + i, 1, 0
        batch.logits[i] = i == len(tokens) - 1
    assert lc.llama_decode(ctx, batch) == 0


def test_state_writer_matches_llama_cpp_and_loads(tmp_path):
    lc = _llama_cpp()
    from sambay.bench.llamacpp import LlamaCpp

    path = write_phi3_gguf(tmp_path / "m.gguf", TINY)
    sub = LlamaCpp(path, TINY, threads=2, state_dir=tmp_path / "states")
    try:
        # a real prefill of 7 tokens, saved by llama.cpp
        st = sub.random_decode_state(1, 0, 16)
        prompt = [11, 22, 33, 44, 55, 66, 77]
        b = lc.llama_batch_init(16, 0, 1)
        _decode(lc, st["ctx"], b, prompt, 0)
        ref = tmp_path / "llama.ggsq"
        toks = (lc.llama_token * 7)(*prompt)
        assert lc.llama_state_seq_save_file(st["ctx"], str(ref).encode(), 0, toks, 7) > 0
        _decode(lc, st["ctx"], b, [99], 7)
        after_prefill = sub.logits(st)
        lc.llama_batch_free(b)
        sub.free(st)
        # our writer, given what llama.cpp saved, writes the same bytes
        parsed = read_seq_state(ref)
        assert list(parsed["positions"]) == list(range(7)) and list(parsed["tokens"]) == prompt
        mine = write_seq_state(tmp_path / "mine.ggsq", TINY, 7, tokens=parsed["tokens"], k=parsed["k"], v=parsed["v"])
        assert mine.read_bytes() == ref.read_bytes()
        # loading that state and decoding the next token gives the logits of the prefilled context
        st = sub.random_decode_state(1, 7, 4)  # writes/loads the random 7-position state (checked inside)
        sub.free(st)
        (tmp_path / "states" / f"{TINY.tag()}-ctx7.ggsq").write_bytes(mine.read_bytes())
        st = sub.random_decode_state(1, 7, 4)
        st["token"] = 99
        sub.decode_step(st)
        np.testing.assert_allclose(sub.logits(st), after_prefill, rtol=1e-5, atol=1e-5)
        assert st["pos"] == 8
        sub.free(st)
    finally:
        sub.close()


def test_quantized_formats_load_the_same_state(tmp_path):
    _llama_cpp()
    from sambay.bench.llamacpp import LlamaCpp, quantize_gguf

    src = write_phi3_gguf(tmp_path / "m.gguf", TINY)
    for fmt in ("Q8_0", "Q4_K_M"):
        q = quantize_gguf(src, tmp_path / f"m-{fmt}.gguf", fmt, threads=2)
        r = gguf.GGUFReader(q)
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["blk.0.ffn_down.weight"].startswith(fmt[:2]), types
        sub = LlamaCpp(q, TINY, threads=2, state_dir=tmp_path / "states")
        try:
            st = sub.random_decode_state(1, 40, 3)  # one state file for every format
            for _ in range(3):
                sub.decode_step(st)
            assert st["pos"] == 43 and np.isfinite(sub.logits(st)).all()
            sub.free(st)
        finally:
            sub.close()
    assert len(list((tmp_path / "states").glob("*.ggsq"))) == 1


def test_peer_harness_on_tiny_shapes(tmp_path, monkeypatch, capsys):
    _llama_cpp()
    from sambay.bench import peer

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    out = tmp_path / "peer.json"
    config = Path(__file__).resolve().parents[1] / "configs" / "sambay-tiny.json"
    rc = peer.main(["--config", str(config), "--shape", json.dumps(dataclasses.asdict(TINY)), "--contexts", "8,32",
                    "--repeats", "2", "--warmup", "1", "--bandwidth-mib", "16", "--cache-dir", str(tmp_path / "c"),
                    "--sambay-cache-dir", str(tmp_path / "s"),
                    "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(p["variant"], p["format"]) for p in res["pairs"]] == [
        ("bf16", "BF16"), ("int8", "Q8_0"), ("int4", "Q4_K_M"), ("int8-a8", "Q8_0"), ("int4-a8", "Q4_K_M")]
    for p in res["pairs"]:
        for n in ("8", "32"):
            c = p["contexts"][n]
            assert len(c["sambay_s"]) == len(c["llama_cpp_s"]) == 2 and c["speed"] > 0
    assert len(res["bandwidth"]) == 2 and "C++ stream read" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["sambay-tiny-bf16", "sambay-tiny-int4",
                                                                  "sambay-tiny-int8"]  # saved once, reused


def test_peer_refuses_active_wait_policy(monkeypatch):
    from sambay.bench import peer

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert peer.main(["--pairs", "int4"]) == 2
