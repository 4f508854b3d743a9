"""Memory measurements: decode-state bytes of the released config (C2) and the peak RSS of loading a
bf16 checkpoint (C7)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sambay import SambaYCache, SambaYConfig, SambaYForCausalLM, cache_nbytes
from sambay.bench.presets import RELEASED

C2_CONTEXTS = {"4k": 4096, "32k": 32768, "64k": 65536}


def decode_state_bytes(progress) -> dict:
    """C2: decode-state bytes of the released config in bf16 at 4K/32K/64K, from the formula
    (``cache_nbytes``) and from the tensors a cache actually allocates (on the meta device: exact sizes,
    no memory), against a same-shape transformer's KV cache (layers x KV heads x head dim x K,V x 2 bytes
    per token) and Phi-4-mini's own (8 KV heads x 128)."""
    cfg = SambaYConfig.from_dict(RELEASED)
    per_token_baseline = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 2
    per_token_phi4mini = 32 * 8 * 128 * 2 * 2
    targets, raw = {}, {"baseline_bytes_per_token": per_token_baseline, "contexts": {}}
    for tag, n in C2_CONTEXTS.items():
        formula = cache_nbytes(cfg, 1, n, torch.bfloat16)
        allocated = SambaYCache(cfg, 1, n, dtype=torch.bfloat16, device="meta").nbytes
        base = per_token_baseline * n
        targets[f"c2_state_bytes_{tag}"] = formula
        targets[f"c2_baseline_bytes_{tag}"] = base
        targets[f"c2_ratio_{tag}"] = base / formula
        raw["contexts"][tag] = {
            "tokens": n,
            "formula_bytes": formula,
            "allocated_bytes": allocated,
            "formula_matches_allocated": formula == allocated,
            "phi4_mini_kv_bytes": per_token_phi4mini * n,
        }
        progress(
            f"C2 decode state at {n} tokens: {formula / 2**20:.1f} MiB (allocated {allocated / 2**20:.1f} MiB) "
            f"vs same-shape KV {base / 2**30:.3f} GiB: {base / formula:.1f}x smaller"
        )
    raw["formula_matches_allocated"] = all(c["formula_matches_allocated"] for c in raw["contexts"].values())
    return {"targets": targets, "raw": raw}


_LOAD_SCRIPT = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import sambay

def peak_rss():
    # VmHWM: this process's peak RSS. ru_maxrss is not usable here: Linux carries the parent's maxrss over
    # fork+exec, so a child of a large benchmark process would report the parent's peak as its own.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (r if sys.platform == "darwin" else r * 1024), "ru_maxrss"  # bytes on macOS, KiB on Linux

base, source = peak_rss()
t0 = time.perf_counter()
model = sambay.SambaYForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
load_s = time.perf_counter() - t0
peak, _ = peak_rss()
by_dtype = {}
for p in model.parameters():
    by_dtype[str(p.dtype)] = by_dtype.get(str(p.dtype), 0) + p.numel() * p.element_size()
print("RESULT " + json.dumps({"base_rss": base, "peak_rss": peak, "rss_source": source, "load_s": load_s,
                             "param_bytes": by_dtype}))
"""


def _child(directory: str, threads: int, mode: str, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, directory, str(threads), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"C7 {mode} process failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def load_peak_rss(plan, threads: int, progress, workdir: str | None = None) -> dict:
    """C7: save a random bf16 model with ``save_pretrained``, then load it in a fresh process with
    ``from_pretrained(dir, dtype=torch.bfloat16)``; (peak RSS - RSS after importing torch and sambay) over
    the safetensors bytes."""
    cfg = SambaYConfig.from_dict(plan.c7_checkpoint)
    with tempfile.TemporaryDirectory(prefix="sambay-bench-c7-", dir=workdir) as tmp:
        torch.manual_seed(7)
        model = SambaYForCausalLM(cfg, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        del model
        gc.collect()
        files = sorted(Path(tmp).glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        progress(
            f"C7 saved a random bf16 checkpoint of {size / 2**20:.1f} MiB ({len(files)} file(s)); loading it "
            f"in a fresh process"
        )
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])  # so the child imports this same sambay
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        r = _child(tmp, threads, "load", env)
    grown = r["peak_rss"] - r["base_rss"]
    ratio = grown / size
    progress(
        f"C7 peak RSS growth {grown / 2**20:.1f} MiB for {size / 2**20:.1f} MiB of safetensors: {ratio:.3f}x "
        f"(load {r['load_s']:.2f} s)"
    )
    raw = {
        "checkpoint_bytes": size,
        "files": len(files),
        "config": {
            k: plan.c7_checkpoint[k]
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        },
        **r,
        "rss_growth": grown,
    }
    return {"targets": {"c7_peak_rss_ratio": ratio}, "raw": raw}
