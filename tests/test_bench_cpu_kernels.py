"""benchmarks.bench_cpu_kernels end to end on the tiny config: it runs, covers every linear shape of the model and
prints each format's total and the decode attention (no timing asserted)."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sambay import SambaYConfig, SambaYForCausalLM
from sambay.bench import load_config
from sambay.kernels.dispatch import cpu_probe
from sambay.layers.linear import Linear

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "sambay-tiny.json"


@pytest.mark.skipif(cpu_probe() is not None, reason="sambay's CPU kernels are not available on this machine")
def test_bench_cpu_kernels_on_the_tiny_config():
    script = ROOT / "benchmarks" / "bench_cpu_kernels.py"
    if not script.is_file():
        pytest.skip("benchmarks/ is not in this checkout")
    argv = [sys.executable, "-m", "benchmarks.bench_cpu_kernels", "--config", str(TINY), "--context", "64",
            "--bandwidth-mib", "16", "--repeats", "3", "--threads", "1", "--cycle-mib", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    model = SambaYForCausalLM(SambaYConfig.from_dict(load_config(TINY)), device="meta")
    shapes = Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, Linear))
    for (n, k), count in shapes.items():  # one line per distinct weight shape, with its count
        assert f"({n:6d}, {k:5d}) x{count:3d}:" in out, (n, k, count, out)
    assert sum(shapes.values()) == sum(int(line.split(" x")[1].split(":")[0]) for line in out.splitlines()
                                       if line.startswith("  (") and " x" in line)
    for fmt in ("bf16", "int8", "int4"):
        assert f"  {fmt}: " in out and "x the floor" in out
    assert "decode attention at 64 keys (avx2):" in out
    assert out.count("C++ stream read") == 2 and out.count("torch.sum fp32") == 2  # both reads, start and end
