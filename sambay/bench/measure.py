"""The measurements, each named by what it measures and returning a plain dict of raw samples (seconds per
repeat, so callers can merge extra repeats and compute intervals) and the sizes it used."""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sambay import SambaYCache, SambaYConfig, SambaYForCausalLM, cache_nbytes
from sambay.bench.timing import interleaved, synchronize


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.inference_mode()
def decode_step_seconds(subjects: list, batch: int, context: int, repeats: int, steps: int = 1,
                        warmup: int = 2) -> dict:
    """Seconds per decode step (``batch`` sequences) from a random decode state at ``context``, each subject
    timed ``repeats`` times, interleaved, ``steps`` steps per sample (the context grows by one per step)."""
    room = warmup + repeats * steps + 1
    states = {s.name: s.random_decode_state(batch, context, room) for s in subjects}
    fns = {s.name: (lambda s=s: s.decode_step(states[s.name])) for s in subjects}  # noqa: F821
    samples = interleaved(fns, repeats, inner=steps, warmup=warmup, device=subjects[0].device)
    del states, fns
    _free()
    return {"batch": batch, "context": context, "steps": steps, "samples_s": samples}


@torch.inference_mode()
def decode_step_seconds_vs_context(subjects: list, contexts: list[int], repeats: int, steps: int = 1,
                                   warmup: int = 2) -> dict:
    """``decode_step_seconds`` at batch 1 for each of ``contexts``, every repeat sweeping all (context,
    subject) pairs in alternating order: a slow phase of the machine then spreads over the whole line instead
    of bending it at one point. Returns {"points": [one decode_step_seconds-shaped dict per context]}."""
    room = warmup + repeats * steps + 1
    states = {f"{n}/{s.name}": s.random_decode_state(1, n, room) for n in contexts for s in subjects}
    fns = {f"{n}/{s.name}": (lambda k=f"{n}/{s.name}", s=s: s.decode_step(states[k])) for n in contexts  # noqa: F821
           for s in subjects}
    samples = interleaved(fns, repeats, inner=steps, warmup=warmup, device=subjects[0].device)
    del states, fns
    _free()
    return {"points": [{"batch": 1, "context": n, "steps": steps,
                        "samples_s": {s.name: samples[f"{n}/{s.name}"] for s in subjects}} for n in contexts]}


@torch.inference_mode()
def decode_latency_seconds(subjects: list, prompt: int, lengths: list[int], warmup: int = 2) -> dict:
    """Cumulative decode time (batch 1) after a random ``prompt``-token decode state, read after each of
    ``lengths`` generated tokens; the subjects take turns in chunks of gcd(lengths) steps."""
    lengths = sorted(lengths)
    chunk = math.gcd(*lengths)
    states = {s.name: s.random_decode_state(1, prompt, lengths[-1] + warmup + 1) for s in subjects}
    for s in subjects:
        for _ in range(warmup):
            s.decode_step(states[s.name])
    total = {s.name: 0.0 for s in subjects}
    latency = {s.name: [] for s in subjects}
    for i, g in enumerate(range(chunk, lengths[-1] + 1, chunk)):
        for s in subjects if i % 2 == 0 else subjects[::-1]:
            synchronize(s.device)
            t0 = time.perf_counter()
            for _ in range(chunk):
                s.decode_step(states[s.name])
            synchronize(s.device)
            total[s.name] += time.perf_counter() - t0
        if g in lengths:
            for n in total:
                latency[n].append(total[n])
    del states
    _free()
    return {"prompt": prompt, "lengths": lengths, "latency_s": latency}


@torch.inference_mode()
def prefill_seconds(subjects: list, tokens: int, repeats: int, warmup: int = 1) -> dict:
    """Seconds per prefill of ``tokens`` random tokens (batch 1, last-token logits) into a fresh cache, after
    ``warmup`` untimed prefills of each subject."""
    g = torch.Generator(device=subjects[0].device).manual_seed(tokens)
    vocab = min(s.model.config.vocab_size for s in subjects)
    ids = torch.randint(0, vocab, (1, tokens), device=subjects[0].device, generator=g)
    fns = {s.name: (lambda s=s: s.prefill(ids)) for s in subjects}
    samples = interleaved(fns, repeats, warmup=warmup, device=subjects[0].device)
    _free()
    return {"tokens": tokens, "samples_s": samples}


@torch.inference_mode()
def prefill_chunk_seconds(subject, context: int, chunk: int) -> float:
    """Seconds to prefill the last ``chunk`` tokens of a ``context``-token prompt (batch 1, last-token logits): one
    chunk after a random decode state of ``context - chunk`` positions. Per token it costs what the end of a full
    prefill of ``context`` tokens costs (the same weights, attention over as many keys), at a fraction of the
    time (a full 2K prefill of a 3.8B transformer in bf16 takes minutes on a 2-core CPU)."""
    state = subject.random_decode_state(1, context - chunk, chunk)
    g = torch.Generator(device=subject.device).manual_seed(context)
    ids = torch.randint(0, subject.model.config.vocab_size, (1, chunk), device=subject.device, generator=g)
    t0 = time.perf_counter()
    subject.prefill_chunk(state, ids)
    seconds = time.perf_counter() - t0
    del state
    _free()
    return seconds


@torch.inference_mode()
def yoco_prefill_seconds(model: SambaYForCausalLM, tokens: int, repeats: int) -> dict:
    """Prefill of ``tokens`` tokens with the cross-decoder on the last position only (``logits_to_keep=1``,
    "skip") against the model body on every position followed by the LM head on the last ("no_skip"): the
    YOCO skip alone. Also the largest |difference| of the skip's last-token logits from a plain forward."""
    g = torch.Generator(device=model.device).manual_seed(tokens)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=model.device, generator=g)

    def skip():
        return model(ids, cache=model.allocate_cache(1, tokens), logits_to_keep=1).logits

    def no_skip():
        return model.lm_head(model.model(ids, cache=model.allocate_cache(1, tokens), logits_to_keep=0)[:, -1:])

    samples = interleaved({"skip": skip, "no_skip": no_skip}, repeats, warmup=1, device=model.device)
    full = model(ids).logits[0, -1].float()
    diff = (skip()[0, -1].float() - full).abs().max().item()
    scale = max(1.0, full.abs().max().item())
    _free()
    return {"tokens": tokens, "samples_s": samples, "logits_max_abs_diff": diff,
            "tolerance": (1e-4 if model.dtype == torch.float32 else 3e-2) * scale}


@torch.inference_mode()
def sliding_layer_seconds(model: SambaYForCausalLM, wraps: int, repeats: int, steps: int = 2,
                          warmup: int = 2) -> dict:
    """Seconds per decode step spent in the sliding-window layers (forward hooks on them, so the growth of
    the full/cross layers with context does not enter) at the same ring phase twice: before the window is
    full ("before_full") and after it has wrapped ``wraps`` times ("after_wraps"). Every sample starts at
    the same position (``cache.seek``); the whole step's time is recorded too."""
    W = model.config.sliding_window
    if not 1 <= steps < W // 2:
        raise ValueError(f"sliding_layer_seconds: expected 1 <= steps < sliding_window/2 = {W // 2}, got {steps}")
    blocks = [m for m in model.modules() if getattr(m, "role", None) == "sliding_attention"]
    spent = {"t": 0.0, "t0": 0.0}

    def pre(_m, _a):
        synchronize(model.device)
        spent["t0"] = time.perf_counter()

    def post(_m, _a, _o):
        synchronize(model.device)
        spent["t"] += time.perf_counter() - spent["t0"]

    positions = {"before_full": W // 2 - steps, "after_wraps": wraps * W + W // 2 - steps}  # same phase
    g = torch.Generator(device=model.device).manual_seed(5)
    caches = {}
    for k, p in positions.items():
        caches[k] = model.allocate_cache(1, p + steps + 1)
        for layer in caches[k].layers:
            for t in vars(layer).values() if layer is not None else ():
                t.normal_(generator=g)
    token = torch.zeros(1, 1, dtype=torch.long, device=model.device)

    def block(k):
        caches[k].seek(positions[k])
        for _ in range(steps):
            model(token, cache=caches[k], logits_to_keep=1)

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    sliding = {k: [] for k in positions}
    whole = {k: [] for k in positions}
    try:
        for k in positions:
            for _ in range(warmup):
                block(k)
        for r in range(repeats):
            for k in list(positions) if r % 2 == 0 else list(positions)[::-1]:
                spent["t"] = 0.0
                synchronize(model.device)
                t0 = time.perf_counter()
                block(k)
                synchronize(model.device)
                whole[k].append((time.perf_counter() - t0) / steps)
                sliding[k].append(spent["t"] / steps)
    finally:
        for h in hooks:
            h.remove()
    _free()
    return {"window": W, "wraps": wraps, "positions": positions, "sliding_layers": len(blocks),
            "samples_s": sliding, "whole_step_samples_s": whole}


def decode_state_bytes(config: dict, contexts: list[int], dtype: torch.dtype = torch.bfloat16) -> dict:
    """Decode-state bytes (batch 1) at each context: the formula (``cache_nbytes``), the bytes a cache
    allocates (on the meta device: exact sizes, no memory), and a same-shape transformer's KV cache
    (layers x KV heads x head dim x K and V x bytes per element, per token)."""
    c = SambaYConfig.from_dict(config)
    per_token = c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * torch.finfo(dtype).bits // 8
    return {"contexts": list(contexts), "dtype": str(dtype).removeprefix("torch."),
            "formula_bytes": [cache_nbytes(c, 1, n, dtype) for n in contexts],
            "allocated_bytes": [SambaYCache(c, 1, n, dtype=dtype, device="meta").nbytes for n in contexts],
            "same_shape_kv_bytes": [per_token * n for n in contexts]}


_LOAD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import sambay

def peak_rss():  # VmHWM: ru_maxrss would carry the parent's peak over fork+exec on Linux
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))

base = peak_rss()
t0 = time.perf_counter()
model = sambay.SambaYForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
print("RESULT " + json.dumps({"base_rss": base, "peak_rss": peak_rss(), "load_s": time.perf_counter() - t0,
                             "param_dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


def load_peak_rss(config: dict, threads: int = 1) -> dict:
    """Save a random bf16 model of ``config`` with ``save_pretrained`` and load it in a fresh process with
    ``from_pretrained(dir, dtype=torch.bfloat16)``: its peak RSS over the RSS after importing sambay, and the
    checkpoint's bytes. Linux only (reads /proc/self/status)."""
    if not Path("/proc/self/status").is_file():
        raise OSError("load_peak_rss reads the peak RSS from /proc/self/status (Linux)")
    with tempfile.TemporaryDirectory(prefix="sambay-bench-") as tmp:
        torch.manual_seed(7)
        model = SambaYForCausalLM(SambaYConfig.from_dict(config), dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        del model
        gc.collect()
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                          os.environ.get("PYTHONPATH", "")])}  # this sambay
        proc = subprocess.run([sys.executable, "-c", _LOAD, tmp, str(threads)], capture_output=True, text=True,
                              env=env, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"load_peak_rss: the loading process failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    r = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    return {"checkpoint_bytes": size, "rss_growth_bytes": r["peak_rss"] - r["base_rss"], **r}


# ------------------------------------------------------------------------------------------ read bandwidth
def bandwidth(mib: int, repeats: int = 5) -> dict:
    """Read bandwidth: the median of ``repeats`` ``torch.sum`` over a ``mib`` MiB fp32 buffer, the C++ streaming
    read of :mod:`sambay.bench.bandwidth` over as many bytes on torch's thread count (``{"error"}`` where it cannot
    be built), and (for reference) a bf16 matrix-vector product over a ``mib / 2`` MiB weight matrix, as a decode
    step's matmuls do. One buffer at a time."""
    from sambay.bench.bandwidth import stream_read_or_error

    return {"sum_fp32": sum_bandwidth(mib, repeats), "stream_cpp": stream_read_or_error(mib, None, repeats),
            "gemv_bf16": _gemv_bandwidth(mib // 2, repeats)}


def sum_bandwidth(mib: int, repeats: int = 5) -> dict:
    """The median of ``repeats`` ``torch.sum`` over a ``mib`` MiB fp32 buffer."""
    buf = torch.ones(mib * 2**20 // 4)
    buf.sum()
    return _timed(lambda: buf.sum(), buf.numel() * 4, repeats)


def _gemv_bandwidth(mib: int, repeats: int, k: int = 4096) -> dict:
    w = torch.full((max(1, mib * 2**20 // (2 * k)), k), 0.01, dtype=torch.bfloat16)
    x = torch.ones(1, k, dtype=torch.bfloat16)
    torch.nn.functional.linear(x, w)
    return _timed(lambda: torch.nn.functional.linear(x, w), w.numel() * 2, repeats)


def _timed(fn, nbytes: int, repeats: int) -> dict:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return {"bytes": nbytes, "samples_s": samples, "gb_per_s": nbytes / statistics.median(samples) / 1e9}
