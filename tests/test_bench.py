"""`sambay bench` end to end on a tiny model: a smoke test of the plumbing, not a timing test (no target
is asserted; the numbers only have to exist and be finite)."""

import json
import math
from pathlib import Path

import pytest

from sambay.bench import presets
from sambay.bench.report import ALL_KEYS, TARGETS
from sambay.cli import main

ROOT = Path(__file__).resolve().parents[1]
PLOTS = [
    "latency_vs_generation.png",
    "throughput_vs_batch.png",
    "decode_step_vs_context.png",
    "prefill_vs_prompt.png",
]


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_bench_runs_end_to_end_and_writes_results_and_plots(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "bench"
    # One thread: this is a smoke test, and a 2-thread OpenMP pool stalls badly when the CI machine is shared.
    assert main(["bench", "--tiny", "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {}
    for key in ALL_KEYS:
        assert key in results, key
        assert _finite(results[key]), (key, results[key])
    for t in TARGETS:
        assert results["verdicts"][t.key] in ("PASS", "MISSED", "INFO", "NO DATA"), t.key
        assert t.key in stdout  # the table names every target
    assert results["checks"]["C2"] is True  # formula == allocated bytes (exact, not timing)
    assert results["checks"]["C3"] is True  # the YOCO skip's last-token logits equal the full forward's
    assert results["machine"]["threads"] == 1 and "cpu" in results["machine"]
    raw = results["raw"]
    assert set(raw["c1"]["step_s"]) == {"sambay", "phi3"}
    assert len(raw["c1"]["step_s"]["sambay"]) == len(raw["c1"]["contexts"])
    assert raw["c6"]["batches"] == [1, 8]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in stdout
        return
    for name in PLOTS:
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(results["plots"]) == sorted(PLOTS)


def test_bench_only_c2_needs_no_model(tmp_path):
    out = tmp_path / "c2"
    assert (
        main(["bench", "--only", "c2", "--threads", "1", "--device", "cpu", "--out", str(out), "--no-plots"])
        == 0
    )
    r = json.loads((out / "results.json").read_text())
    # the released config: 43/183/343 MiB of decode state against 0.625/5/10 GiB (PERFORMANCE.md)
    assert [round(r[f"c2_state_bytes_{k}"] / 2**20) for k in ("4k", "32k", "64k")] == [43, 183, 343]
    assert r["c2_baseline_bytes_32k"] == 5 * 2**30
    assert r["verdicts"]["c2_ratio_4k"] == "PASS" and r["checks"]["C2"] is True
    assert "c1_slope_ratio" not in r


@pytest.mark.parametrize("argv", [["--only", "c9"], ["--threads", "0"], ["--repeats", "0"]])
def test_bench_rejects_bad_arguments(tmp_path, argv, capsys):
    assert main(["bench", "--out", str(tmp_path), *argv]) == 2
    assert "sambay bench:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name,preset",
    [("phi4-mini-flash-reasoning.json", presets.RELEASED), ("sambay-scaled-cpu.json", presets.SCALED_CPU)],
)
def test_preset_configs_match_the_checkout(name, preset):
    path = ROOT / "configs" / name
    if not path.is_file():
        pytest.skip(f"{path} not in this checkout")
    config = json.loads(path.read_text())
    assert {k: config[k] for k in preset} == preset


def test_bench_with_two_threads_runs_in_a_child_with_passive_openmp(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    out = tmp_path / "child"
    assert (
        main(["bench", "--only", "c2", "--threads", "2", "--device", "cpu", "--out", str(out), "--no-plots"])
        == 0
    )
    r = json.loads((out / "results.json").read_text())
    assert r["machine"]["omp_wait_policy"] == "PASSIVE" and r["machine"]["threads"] == 2


def test_gpu_script_runs_on_cpu_with_a_tiny_model(tmp_path, capsys):
    """benchmarks/bench_gpu.py cannot be timed without a GPU; this runs its code paths on a tiny model."""
    pytest.importorskip("transformers")
    import importlib.util

    script = ROOT / "benchmarks" / "bench_gpu.py"
    if not script.is_file():
        pytest.skip("benchmarks/ is not in this checkout")
    spec = importlib.util.spec_from_file_location("bench_gpu", script)
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--repeats",
        "2",
        "--steps",
        "2",
        "--batch",
        "4",
        "--out",
        str(tmp_path),
    ]
    assert bench_gpu.main(argv) == 0
    r = json.loads((tmp_path / "gpu_results.json").read_text())
    for key in ("g1_ratio_to_floor", "g2_ratio", "g3_tps_ratio"):
        assert _finite(r[key]), key
    out = capsys.readouterr().out
    assert all(g in out for g in ("G1", "G2", "G3", "G6"))
