"""Peak RSS while loading a bf16 checkpoint stays within 1.05x of the file size (validation by the official
safetensors parser and the NaN/inf screen included). Run as a script for other sizes:

    python tests/test_loading_memory.py 330   # MB of random bf16 weights; prints the ratio and the load time
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sambay import SambaYConfig, SambaYForCausalLM

ROOT = Path(__file__).resolve().parents[1]
_CODES = {torch.bfloat16: "BF16", torch.float32: "F32"}

# In a fresh process: the peak RSS (VmHWM; ru_maxrss would carry over a big parent's peak across fork+exec)
# after importing, then after from_pretrained (argv[2]: quantize, "" for none); the loaded model's bytes.
_CHILD = r"""
import json, sys, time, torch, sambay
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
torch.set_num_threads(1)
base = hwm()
t0 = time.perf_counter()
model = sambay.SambaYForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, quantize=sys.argv[2] or None)
load_s = time.perf_counter() - t0
tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()
print("RESULT " + json.dumps({"base": base, "peak": hwm(), "load_s": load_s,
                              "model_bytes": sum(t.numel() * t.element_size() for t in tensors)}))
"""


def _config(megabytes: int) -> dict:
    """hidden 896, 16 heads of 64, window 64, 32000 tokens (57 MB of embedding); ~17.7 MB of bf16 per layer."""
    layers = max(4, round((megabytes - 57) / 17.7 / 4) * 4)
    return dict(vocab_size=32000, hidden_size=896, intermediate_size=2048, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=8, sliding_window=64, torch_dtype="bfloat16")


def write_random_checkpoint(directory: Path, config: dict, seed: int = 0) -> int:
    """The file save_pretrained would write for a random bf16 model (fp32 A_log/D/lambdas), streamed one
    tensor at a time so that this process never holds the weights. Returns the file size."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = SambaYConfig.from_dict(config)
    cfg.to_json(directory / "config.json")
    with torch.device("meta"):
        params = dict(SambaYForCausalLM(cfg, dtype=torch.bfloat16).named_parameters())
    header, offset = {}, 0
    for name, p in params.items():
        nbytes = p.numel() * p.element_size()
        header[name] = {"dtype": _CODES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    gen = torch.Generator().manual_seed(seed)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for p in params.values():
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype)
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return (directory / "model.safetensors").stat().st_size


def measure(directory: Path, quantize: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(directory), quantize or ""], capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    size = (directory / "model.safetensors").stat().st_size
    return dict(r, size=size, ratio=(r["peak"] - r["base"]) / size)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_peak_rss_of_a_bf16_load_is_within_1_05x_of_the_file(tmp_path):
    write_random_checkpoint(tmp_path / "ckpt", _config(330))
    r = measure(tmp_path / "ckpt")
    assert r["size"] > 300e6
    assert r["ratio"] <= 1.05, f"peak RSS growth {r['peak'] - r['base']} B for a {r['size']} B file: {r['ratio']:.3f}x"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        size = write_random_checkpoint(Path(tmp) / "ckpt", _config(int(sys.argv[1]) if len(sys.argv) > 1 else 330))
        for quantize in [None, *sys.argv[2:]]:  # e.g. python tests/test_loading_memory.py 330 int8 int4
            r = measure(Path(tmp) / "ckpt", quantize)
            print(f"{size / 1e6:.1f} MB bf16 checkpoint, quantize={quantize}: peak RSS growth "
                  f"{(r['peak'] - r['base']) / 1e6:.1f} MB = {r['ratio']:.4f}x the file, "
                  f"{(r['peak'] - r['base']) / r['model_bytes']:.4f}x the loaded model ({r['model_bytes'] / 1e6:.1f} "
                  f"MB); load {r['load_s']:.2f} s")
