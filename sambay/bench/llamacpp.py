"""llama.cpp as the CPU peer: a Phi-4-mini-shaped GGUF with random weights, its Q8_0 / Q4_K_M quantizations, decode
at depth from a sequence-state file, and a subject with the same interface as ``sambay.bench.subjects`` (run in its
own process, so that llama.cpp's threads and torch's never share a process).

Needs ``gguf`` (the writer) and ``llama-cpp-python`` (built from its sdist for this CPU, e.g.
``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python``; the build takes minutes on 2 cores). The side-by-side
benchmark that uses this is ``sambay.bench.peer``.

The GGUF is written as llama.cpp's converter writes microsoft/Phi-4-mini-instruct (``conversion/phi.py``,
``Phi3MiniModel`` in the llama.cpp vendored by llama-cpp-python 0.3.36; the loader is ``src/models/phi3.cpp``):
architecture ``phi3``; fused ``attn_qkv`` (rows q, k, v) and ``ffn_up`` (rows gate, up); tied embeddings (no
``output.weight``); the 2-D weights in BF16 and the norms in F32; rope dimension ``int(0.75 * hidden) // heads`` (96)
with the LongRoPE factor tensors and attention factor; ``sliding_window`` as in the HF config (llama.cpp disables it
for phi3). ``tokenizer.ggml.model = "none"`` and ``phi3.vocab_size`` load the model without a vocabulary (ids in,
logits out). Weights are N(0, 0.02) values tiled from one random block: a step's cost does not depend on them.

Decode at depth: the sequence-state file llama.cpp's ``llama_state_seq_save_file`` writes, written here directly
with random F16 K/V (``write_seq_state``; layout from ``llama_kv_cache::state_write`` in ``src/llama-kv-cache.cpp``).
It holds only the KV cache (F16 whatever the weight format), so one file per context serves BF16, Q8_0 and Q4_K_M.
Every load is checked: llama.cpp's reader checks the layer count, each layer's K/V type and row size and the V
layout; the subject then checks the bytes read, the sequence's last position, and finite logits after the first step.
The test suite checks the writer against a file llama.cpp itself saved after a real prefill (byte-identical).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

STATE_MAGIC, STATE_VERSION = 0x67677371, 3  # LLAMA_STATE_SEQ_MAGIC ('ggsq'), LLAMA_STATE_SEQ_VERSION
GGML_TYPE_F16 = 1
FORMATS = {"BF16": None, "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


@dataclass(frozen=True)
class Phi3Shape:
    """The hyperparameters of a ``phi3`` GGUF (defaults: microsoft/Phi-4-mini-instruct's config.json)."""

    vocab_size: int = 200064
    hidden_size: int = 3072
    num_hidden_layers: int = 32
    num_attention_heads: int = 24
    num_key_value_heads: int = 8
    intermediate_size: int = 8192
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    partial_rotary_factor: float = 0.75
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: int = 262144

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dims(self) -> int:  # as the converter: int(partial_rotary_factor * hidden) // heads
        return int(self.partial_rotary_factor * self.hidden_size) // self.num_attention_heads

    @property
    def kv_row_bytes(self) -> int:
        """Bytes of one cached position's K (or V) in one layer: F16, all KV heads."""
        return self.num_key_value_heads * self.head_dim * 2

    def tag(self) -> str:
        return (f"phi3-h{self.hidden_size}-l{self.num_hidden_layers}-a{self.num_attention_heads}-"
                f"kv{self.num_key_value_heads}-i{self.intermediate_size}-v{self.vocab_size}")

    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, numpy shape (out, in), "bf16" | "f32") of every tensor, in the converter's order."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        out = [("token_embd.weight", (self.vocab_size, h), "bf16")]
        for i in range(self.num_hidden_layers):
            b = f"blk.{i}."
            out += [(b + "attn_norm.weight", (h,), "f32"), (b + "attn_qkv.weight", (h + 2 * kv, h), "bf16"),
                    (b + "attn_output.weight", (h, h), "bf16"), (b + "ffn_norm.weight", (h,), "f32"),
                    (b + "ffn_up.weight", (2 * self.intermediate_size, h), "bf16"),
                    (b + "ffn_down.weight", (h, self.intermediate_size), "bf16")]
        half = self.rope_dims // 2
        out += [("output_norm.weight", (h,), "f32"), ("rope_factors_long.weight", (half,), "f32"),
                ("rope_factors_short.weight", (half,), "f32")]
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for n, s, _ in self.tensors() if not n.startswith("rope_factors"))


def _random_block(seed: int, n: int = 1 << 24, std: float = 0.02) -> np.ndarray:
    """n normal values as bf16 bit patterns (uint16): the upper half of fp32, rounded to nearest even."""
    x = np.random.default_rng(seed).normal(0.0, std, n).astype(np.float32).view(np.uint32)
    return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint16)


def _tiled(block: np.ndarray, n: int, offset: int) -> np.ndarray:
    """n values of ``block`` repeated from position ``offset`` (each tensor starts elsewhere in the block)."""
    reps = (offset % block.size + n) // block.size + 1
    start = offset % block.size
    return np.tile(block, reps)[start:start + n] if n > block.size - start else block[start:start + n]


def write_phi3_gguf(path: str | Path, shape: Phi3Shape = Phi3Shape(), seed: int = 0) -> Path:
    """Write a BF16 ``phi3`` GGUF with random weights (see the module docstring), streaming one tensor at a time;
    atomically (a ``.tmp`` file renamed at the end)."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "phi3")
    w.add_name("random Phi-4-mini-shaped transformer (sambay.bench.llamacpp)")
    w.add_context_length(shape.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(shape.original_max_position_embeddings)
    w.add_embedding_length(shape.hidden_size)
    w.add_feed_forward_length(shape.intermediate_size)
    w.add_block_count(shape.num_hidden_layers)
    w.add_head_count(shape.num_attention_heads)
    w.add_head_count_kv(shape.num_key_value_heads)
    w.add_layer_norm_rms_eps(shape.rms_norm_eps)
    w.add_rope_dimension_count(shape.rope_dims)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_sliding_window(shape.sliding_window)
    scale = shape.max_position_embeddings / shape.original_max_position_embeddings
    w.add_rope_scaling_attn_factors(  # LongRoPE, as the converter computes it
        math.sqrt(1 + math.log(scale) / math.log(shape.original_max_position_embeddings)) if scale > 1 else 1.0)
    w.add_tokenizer_model("none")
    w.add_vocab_size(shape.vocab_size)
    specs = shape.tensors()
    for name, dims, kind in specs:
        dtype = np.dtype(np.uint16) if kind == "bf16" else np.dtype(np.float32)
        raw = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else None
        w.add_tensor_info(name, dims, dtype, math.prod(dims) * dtype.itemsize, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    block = _random_block(seed)
    offset = 0
    for name, dims, kind in specs:
        n = math.prod(dims)
        if kind == "bf16":
            w.write_tensor_data(_tiled(block, n, offset).reshape(dims))
            offset += 7919 * 1031  # another start in the block for the next tensor
        elif name.startswith("rope_factors_long"):
            w.write_tensor_data(np.linspace(1.0, 40.0, n, dtype=np.float32))  # the cost does not depend on them
        else:
            w.write_tensor_data(np.ones(dims, dtype=np.float32))
    w.close()
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ sequence-state files
def write_seq_state(path: str | Path, shape: Phi3Shape, context: int, seed: int = 0, tokens: np.ndarray | None = None,
                    k: list[bytes] | None = None, v: list[bytes] | None = None) -> Path:
    """The file ``llama_state_seq_save_file`` writes for one sequence holding positions 0..context-1 (one stream,
    F16 K/V, V not transposed, as with flash attention), atomically. Without ``tokens`` / ``k`` / ``v``: random
    token ids and random N(0, 1) F16 K/V; with them: these (per layer ``context * kv_row_bytes`` bytes each)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if tokens is None:
        tokens = rng.integers(0, shape.vocab_size, context, dtype=np.int32)
    row, layers = shape.kv_row_bytes, shape.num_hidden_layers
    cells = np.zeros(context, dtype=[("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])
    cells["pos"], cells["n_seq"] = np.arange(context), 1
    block = rng.standard_normal(1 << 22).astype(np.float16).view(np.uint16)  # 8 MiB of random F16 values
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<III", STATE_MAGIC, STATE_VERSION, context))
        f.write(np.asarray(tokens, dtype="<i4").tobytes())
        f.write(struct.pack("<II", 1, context))  # n_stream, cell_count
        f.write(cells.tobytes())
        f.write(struct.pack("<II", 0, layers))  # v_trans, n_layer
        for j, given in enumerate((k, v)):
            for i in range(layers):
                f.write(struct.pack("<iQ", GGML_TYPE_F16, row))
                if given is not None:
                    if len(given[i]) != context * row:
                        raise ValueError(f"write_seq_state: layer {i}: expected {context * row} bytes, got "
                                         f"{len(given[i])}")
                    f.write(given[i])
                else:
                    _tiled(block, context * row // 2, (2 * i + j) * 4099 * 64 + 1).tofile(f)  # whole F16 values
    os.replace(tmp, path)
    return path


def read_seq_state(path: str | Path) -> dict:
    """Parse a sequence-state file of ``write_seq_state``'s layout (one stream, no cell extensions, V not
    transposed): {"tokens", "positions", "seq_ids", "k": [bytes per layer], "v": [...], "row": bytes}. Raises
    ValueError naming the first field that differs from that layout."""
    data = Path(path).read_bytes()
    off = 0

    def take(fmt: str):
        nonlocal off
        vals = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return vals

    magic, version, n_tok = take("<III")
    if (magic, version) != (STATE_MAGIC, STATE_VERSION):
        raise ValueError(f"read_seq_state: expected magic/version {STATE_MAGIC:#x}/{STATE_VERSION}, got "
                         f"{magic:#x}/{version}")
    tokens = np.frombuffer(data, "<i4", n_tok, off).copy()
    off += 4 * n_tok
    n_stream, cells = take("<II")
    if n_stream != 1:
        raise ValueError(f"read_seq_state: expected 1 stream, got {n_stream}")
    meta = np.frombuffer(data, [("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")], cells, off)
    if np.any(meta["n_seq"] != 1):
        raise ValueError("read_seq_state: expected one sequence id per cell")
    off += meta.nbytes
    v_trans, layers = take("<II")
    if v_trans:
        raise ValueError("read_seq_state: expected V not transposed (flash attention), got v_trans = 1")
    out: dict = {"tokens": tokens, "positions": meta["pos"].copy(), "seq_ids": meta["seq"].copy(), "k": [], "v": []}
    for key in ("k", "v"):
        for i in range(layers):
            typ, row = take("<iQ")
            if typ != GGML_TYPE_F16:
                raise ValueError(f"read_seq_state: {key} of layer {i}: expected type F16 ({GGML_TYPE_F16}), got {typ}")
            out[key].append(data[off:off + cells * row])
            out["row"] = row
            off += cells * row
    if off != len(data):
        raise ValueError(f"read_seq_state: {len(data) - off} bytes left after the last layer")
    return out


# ------------------------------------------------------------------------------------------ llama.cpp itself
def llama_cpp_module():
    """``llama_cpp`` (llama-cpp-python), or ImportError saying how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise ImportError("the llama.cpp peer needs llama-cpp-python built for this CPU: "
                          "CMAKE_ARGS='-DGGML_NATIVE=ON' pip install llama-cpp-python (minutes to build)") from None
    return llama_cpp


def quantize_gguf(src: str | Path, dst: str | Path, fmt: str, threads: int) -> Path:
    """llama.cpp's own quantization (``llama_model_quantize``) of a BF16 GGUF to ``fmt`` (Q8_0, Q4_K_M), atomically."""
    if not FORMATS.get(fmt):
        raise ValueError(f"quantize_gguf: expected one of {[f for f in FORMATS if FORMATS[f]]}, got {fmt!r}")
    lc = llama_cpp_module()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, FORMATS[fmt])
    params.nthread = threads
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {fmt}) returned {rc}")
    os.replace(tmp, dst)
    return dst


_LOG: list = []  # the ctypes log callback, kept alive for the process


def quiet_logs(lc) -> None:
    """llama.cpp's log to stderr from warnings up (its loader prints a line per tensor at INFO)."""
    if _LOG:
        return
    last = [0]

    def log(level: int, text: bytes, _user) -> None:
        if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous message
            last[0] = level
        if last[0] >= 3:  # WARN, ERROR
            sys.stderr.write(text.decode("utf-8", "replace"))

    _LOG.append(lc.llama_log_callback(log))
    lc.llama_log_set(_LOG[0], None)


class LlamaCpp:
    """A GGUF in llama.cpp, in this process, as a benchmark subject: ``random_decode_state`` loads a
    sequence-state file of ``context`` random positions (written once into ``state_dir``), ``decode_step`` decodes
    the greedy token at the next position (one token, logits of it, argmax)."""

    name = "llama.cpp"
    device = "cpu"

    def __init__(self, gguf_path: str | Path, shape: Phi3Shape, threads: int, state_dir: str | Path):
        lc = self.lc = llama_cpp_module()
        quiet_logs(lc)
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        if n_vocab != shape.vocab_size:
            raise RuntimeError(f"{gguf_path}: expected a vocabulary of {shape.vocab_size}, llama.cpp reports {n_vocab}")
        self.shape, self.threads, self.state_dir = shape, threads, Path(state_dir)
        self.path = Path(gguf_path)

    def state_file(self, context: int) -> Path:
        f = self.state_dir / f"{self.shape.tag()}-ctx{context}.ggsq"
        if not f.is_file():
            write_seq_state(f, self.shape, context)
        return f

    def random_decode_state(self, batch: int, context: int, room: int) -> dict:
        if batch != 1:
            raise ValueError(f"the llama.cpp subject decodes batch 1, got batch {batch}")
        lc = self.lc
        cp = lc.llama_context_default_params()
        cp.n_ctx = context + room
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED  # what "auto" picks on a CPU; the state file's V layout
        cp.no_perf = True
        ctx = lc.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {context + room} positions")
        state = {"ctx": ctx, "pos": context, "checked": False, "context": context}
        if context:
            f = self.state_file(context)
            toks = (lc.llama_token * context)()
            n = ctypes.c_size_t(0)
            nread = lc.llama_state_seq_load_file(ctx, str(f).encode(), 0, toks, context, ctypes.byref(n))
            last = lc.llama_memory_seq_pos_max(lc.llama_get_memory(ctx), 0)
            if nread != f.stat().st_size or n.value != context or last != context - 1:
                lc.llama_free(ctx)
                raise RuntimeError(f"llama.cpp did not take the state {f} for {self.path.name}: read {nread} of "
                                   f"{f.stat().st_size} bytes, {n.value} tokens, last position {last} (expected "
                                   f"{context - 1})")
        state["token"] = int(np.random.default_rng(context).integers(0, self.shape.vocab_size))
        state["batch"] = lc.llama_batch_init(1, 0, 1)
        return state

    def decode_step(self, state: dict) -> None:
        lc, b = self.lc, state["batch"]
        b.n_tokens = 1
        b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = state["token"], state["pos"], 1, 0, 1
        rc = lc.llama_decode(state["ctx"], b)
        if rc != 0:
            raise RuntimeError(f"llama_decode at position {state['pos']} returned {rc}")
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(state["ctx"], -1), shape=(self.shape.vocab_size,))
        if not state["checked"]:
            if not np.isfinite(logits).all():
                raise RuntimeError(f"llama.cpp: non-finite logits at position {state['pos']} after the state")
            state["checked"] = True
        state["token"] = int(logits.argmax())
        state["pos"] += 1

    def logits(self, state: dict) -> np.ndarray:
        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(state["ctx"], -1),
                                     shape=(self.shape.vocab_size,)).copy()

    def free(self, state: dict) -> None:
        if state.get("ctx"):
            self.lc.llama_batch_free(state.pop("batch"))
            self.lc.llama_free(state.pop("ctx"))

    def close(self) -> None:
        if getattr(self, "model", None):
            self.lc.llama_model_free(self.model)
            self.model = None


# ------------------------------------------------------------------------------------------ in its own process
def _serve(gguf_path: str, shape: dict, threads: int, state_dir: str) -> int:
    """The worker: one JSON command a line on stdin, one JSON answer a line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # llama.cpp's and anyone's prints stay off the protocol
    try:
        subject = LlamaCpp(gguf_path, Phi3Shape(**shape), threads, state_dir)
        reply = {"ok": True, "pid": os.getpid()}
    except Exception as e:  # reported to the parent, which raises it
        subject, reply = None, {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out.write(json.dumps(reply) + "\n")
    out.flush()
    states: dict[int, dict] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "state":
                t0 = time.perf_counter()
                states[cmd["id"]] = subject.random_decode_state(1, cmd["context"], cmd["room"])
                reply = {"ok": True, "seconds": time.perf_counter() - t0}
            elif cmd["op"] == "step":
                t0 = time.perf_counter()
                subject.decode_step(states[cmd["id"]])
                reply = {"ok": True, "seconds": time.perf_counter() - t0}
            elif cmd["op"] == "free":
                subject.free(states.pop(cmd["id"]))
                reply = {"ok": True}
            elif cmd["op"] == "exit":
                break
            else:
                reply = {"ok": False, "error": f"unknown op {cmd['op']!r}"}
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    for s in states.values():
        subject.free(s)
    if subject is not None:
        subject.close()
    return 0


class _State(dict):
    """A decode state held by the worker; freed there when dropped here."""

    def __del__(self):
        proc = self.get("proc")
        if proc is not None and proc.alive():
            proc.call({"op": "free", "id": self["id"]})


class LlamaCppProcess:
    """``LlamaCpp`` in a worker process (``python -m sambay.bench.llamacpp --worker``), with the same interface: a
    decode step is one command and its answer over pipes (~0.1 ms, included in the timing; ``worker_seconds``
    holds the worker's own times of the steps). ``env`` adds to the worker's environment (e.g. OMP_WAIT_POLICY)."""

    name = "llama.cpp"
    device = "cpu"

    def __init__(self, gguf_path: str | Path, shape: Phi3Shape, threads: int, state_dir: str | Path,
                 env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sambay.bench.llamacpp", "--worker", str(gguf_path), "--threads", str(threads),
             "--state-dir", str(state_dir), "--shape", json.dumps(asdict(shape))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        first = self._read()
        if not first.get("ok"):
            self.close()
            raise RuntimeError(f"the llama.cpp worker for {gguf_path} failed to start: {first.get('error')}")
        self.pid, self._next, self.worker_seconds = first["pid"], 0, []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited (status {self.proc.poll()}); see its stderr above")
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if not reply.get("ok"):
            raise RuntimeError(f"llama.cpp worker, {cmd['op']}: {reply.get('error')}")
        return reply

    def random_decode_state(self, batch: int, context: int, room: int) -> dict:
        if batch != 1:
            raise ValueError(f"the llama.cpp subject decodes batch 1, got batch {batch}")
        self._next += 1
        self.call({"op": "state", "id": self._next, "context": context, "room": room})
        return _State(proc=self, id=self._next, pos=context)

    def decode_step(self, state: dict) -> None:
        self.worker_seconds.append(self.call({"op": "step", "id": state["id"]})["seconds"])
        state["pos"] += 1

    def close(self) -> None:
        if self.alive():
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="the llama.cpp peer's worker process (see LlamaCppProcess)")
    p.add_argument("--worker", required=True, help="the GGUF file")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--shape", required=True, help="Phi3Shape fields as JSON")
    a = p.parse_args(argv)
    return _serve(a.worker, json.loads(a.shape), a.threads, a.state_dir)


if __name__ == "__main__":
    sys.exit(main())
