"""`sambay bench` and benchmarks/: smoke tests of the plumbing on the tiny config (no timing is asserted), and
the verdict rules of benchmarks/targets.py on synthetic numbers (intervals, INCONCLUSIVE, target sizes)."""

import json
import math
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

import sambay.bench as sb
from sambay import SambaYConfig
from sambay.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "sambay-tiny.json")
TINY_SIZES = ["--config", TINY, "--contexts", "32,256", "--batches", "1,2", "--prompts", "16,32", "--repeats", "2"]


@pytest.fixture
def bench_scripts(monkeypatch):
    """The benchmarks package, as its scripts run (``python -m benchmarks.run`` from the checkout root)."""
    if not (ROOT / "benchmarks" / "targets.py").is_file():
        pytest.skip("benchmarks/ is not in this checkout")
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import run, targets

    return run, targets


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------- sambay bench
@pytest.mark.slow
def test_sambay_bench_prints_side_by_side_ratios_and_writes_results(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["bench", *TINY_SIZES, "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "results.json").read_text())
    assert [(d["batch"], d["context"]) for d in r["decode"]] == [(1, 32), (1, 256), (1, 4096), (2, 4096)]
    assert [p["tokens"] for p in r["prefill"]] == [16, 32]
    for m in r["decode"] + r["prefill"]:
        assert set(m["samples_s"]) == {"sambay", "phi3"}
        assert all(len(v) >= 2 and all(_finite(x) and x > 0 for x in v) for v in m["samples_s"].values())
    s = r["decode_state"]
    assert s["formula_bytes"] == s["allocated_bytes"]  # exact, not timing
    assert "sambay/phi3 [95% interval]" in out and "decode step, batch 2, context 4096" in out
    assert r["machine"]["threads"] == 1


@pytest.mark.parametrize("argv,message", [(["--contexts", "a"], "--contexts"), (["--threads", "0"], "--threads"),
                                          (["--config", "no-such-config"], "no-such-config")])
def test_sambay_bench_rejects_bad_arguments(tmp_path, argv, message, capsys):
    assert main(["bench", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert "sambay bench:" in err and message in err


def test_shipped_configs_resolve_as_package_data():
    for name in sb.CONFIGS:
        path = resources.files("sambay.bench") / "configs" / f"{name}.json"
        assert path.is_file(), path
        assert sb.load_config(name) == json.loads(path.read_text())
    assert SambaYConfig.from_dict(sb.load_config("phi4-mini-flash-reasoning")).hidden_size == 2560
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        sb.load_config("nothing-here")


@pytest.mark.slow
def test_sambay_bench_with_two_threads_runs_in_a_child_with_passive_openmp(tmp_path):
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    small = ["--config", TINY, "--contexts", "16", "--batches", "1", "--prompts", "8", "--repeats", "1"]
    proc = subprocess.run([sys.executable, "-m", "sambay.cli", "bench", *small, "--threads", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["machine"]["omp_wait_policy"] == "PASSIVE" and r["machine"]["threads"] == 2


def test_bootstrap_pairs_the_samples_of_one_repeat():
    # The same slow phases hit both subjects (interleaved): the ratio is exact though each side is noisy.
    phases = [1.0, 3.0, 1.5, 5.0, 2.0, 1.2, 4.0]
    paired = sb.ratio([0.5 * p for p in phases], phases)
    assert paired["value"] == pytest.approx(0.5) and paired["interval"] == pytest.approx([0.5, 0.5])
    unpaired = sb.ratio([0.5 * p for p in phases], phases[::-1])
    assert unpaired["interval"][0] < 0.45 and unpaired["interval"][1] > 0.55
    with pytest.raises(ValueError, match="one length"):
        sb.bootstrap(lambda m: 0.0, [{"a": [1.0, 2.0], "b": [1.0]}])


def test_joint_bootstrap_keeps_a_sweep_together():
    # One sweep over two points per repeat: a slow phase scales both points, so their ratio is exact only
    # when the points are resampled with the same indices.
    phases = [1.0, 3.0, 1.5, 5.0, 2.0, 1.2, 4.0]
    groups = [{"t": [1.0 * p for p in phases]}, {"t": [2.0 * p for p in phases]}]
    growth = lambda m: m[1]["t"] / m[0]["t"]  # noqa: E731
    assert sb.bootstrap(growth, groups, joint=True) == pytest.approx((2.0, 2.0))
    lo, hi = sb.bootstrap(growth, groups)
    assert lo < 1.8 and hi > 2.2
    with pytest.raises(ValueError, match="same number of repeats"):
        sb.bootstrap(growth, [{"t": [1.0, 2.0]}, {"t": [1.0, 2.0, 3.0]}], joint=True)


# --------------------------------------------------------------------------------------- verdict rules
def _est(targets, lo, hi, **kw):
    return targets.Estimate((lo + hi) / 2, (lo, hi), "synthetic", **kw)


def test_a_verdict_needs_the_whole_interval_on_one_side(bench_scripts):
    _, T = bench_scripts
    le, gt = T.BY_KEY["c3_skip_ratio"], T.BY_KEY["c6_tps_ratio_b1"]  # <= 0.70 ; > 1.0
    assert T.judge(le, _est(T, 0.50, 0.69))[0] == T.PASS
    assert T.judge(le, _est(T, 0.71, 0.90))[0] == T.MISSED
    verdict, reason = T.judge(le, _est(T, 0.60, 0.80))
    assert verdict == T.INCONCLUSIVE and "straddles 0.7" in reason
    assert T.judge(gt, _est(T, 1.01, 1.30))[0] == T.PASS
    assert T.judge(gt, _est(T, 0.80, 1.00))[0] == T.MISSED
    assert T.judge(gt, _est(T, 0.95, 1.10))[0] == T.INCONCLUSIVE
    ge = T.BY_KEY["c2_ratio_4k"]  # >= 14
    assert T.judge(ge, _est(T, 14.0, 14.0))[0] == T.PASS
    assert T.judge(ge, _est(T, 13.0, 13.9))[0] == T.MISSED


def test_no_pass_off_the_target_size_or_with_a_problem_or_a_failed_check(bench_scripts):
    _, T = bench_scripts
    t = T.BY_KEY["c4_vs_phi3_8k"]
    verdict, reason = T.judge(t, _est(T, 0.1, 0.2, at_target_size=False))
    assert verdict == T.NOT_AT_SIZE and "8192 tokens" in reason
    assert T.judge(t, _est(T, 0.1, 0.2, problems=["sambay slope is not positive"]))[0] == T.INCONCLUSIVE
    assert T.judge(t, _est(T, 0.1, 0.2, failures=["logits differ"]))[0] == T.MISSED
    assert T.judge(t, None)[0] == "NOT MEASURED"
    assert T.judge(t, _est(T, float("nan"), float("nan")))[0] == T.INCONCLUSIVE


def _decode_points(contexts, base, slope, noise=lambda r, i: 0.0, repeats=7):
    """decode_step_seconds-shaped dicts: t = base + slope * N (+ noise(repeat, point)) per subject."""
    return [{"batch": 1, "context": n, "samples_s": {
        name: [b + s * n + noise(r, i) for r in range(repeats)] for name, b, s in
        (("sambay", base[0], slope[0]), ("phi3", base[1], slope[1]))}} for i, n in enumerate(contexts)]


def test_c1_judges_only_clean_positive_slopes_over_the_named_contexts(bench_scripts):
    _, T = bench_scripts
    target = T.BY_KEY["c1_slope_ratio"]
    jitter = lambda r, i: 1e-4 * ((r * 7 + i * 3) % 5 - 2)  # noqa: E731 -- +-0.2 ms, deterministic
    clean = T.c1_slope_ratio(_decode_points([512, 4096, 16384], (0.02, 0.02), (2e-7, 1e-6), jitter))
    assert clean.value == pytest.approx(0.2, rel=0.05) and clean.interval[0] <= clean.value <= clean.interval[1]
    assert T.judge(target, clean)[0] == T.PASS
    # quick sizes that stop at 8K: the value is reported, no verdict
    short = T.c1_slope_ratio(_decode_points([512, 2048, 8192], (0.02, 0.02), (2e-7, 1e-6), jitter))
    assert T.judge(target, short)[0] == T.NOT_AT_SIZE
    # a negative sambay slope gives a ratio far below the bound, and still no PASS
    negative = T.c1_slope_ratio(_decode_points([512, 4096, 16384], (0.02, 0.02), (-1e-7, 1e-6), jitter))
    verdict, reason = T.judge(target, negative)
    assert negative.value < 0 and verdict == T.INCONCLUSIVE and "not positive" in reason
    # points that a line does not fit (one slow phase at the middle point hits both subjects)
    bump = lambda r, i: 0.05 if i == 1 else 0.0  # noqa: E731
    zigzag = T.c1_slope_ratio(_decode_points([512, 4096, 16384], (0.02, 0.02), (2e-7, 1e-6), bump))
    verdict, reason = T.judge(target, zigzag)
    assert verdict == T.INCONCLUSIVE and "R^2" in reason


def test_c1_noise_larger_than_the_growth_is_inconclusive(bench_scripts):
    _, T = bench_scripts
    noisy = lambda r, i: 0.004 * ((r * 5 + i * 2) % 7 - 3)  # noqa: E731 -- +-12 ms against ~6 ms of growth
    est = T.c1_slope_ratio(_decode_points([512, 4096, 16384], (0.02, 0.02), (1e-7, 4e-7), noisy))
    assert est.interval[0] < 0.4 < est.interval[1]
    assert T.judge(T.BY_KEY["c1_slope_ratio"], est)[0] == T.INCONCLUSIVE


def test_c4_and_c6_are_judged_at_their_sizes_only(bench_scripts):
    _, T = bench_scripts

    def prefill(tokens, s, p):
        return {"tokens": tokens, "samples_s": {"sambay": [s * x for x in (1, 1.01, 0.99)],
                                                 "phi3": [p * x for x in (1, 1.01, 0.99)]}}

    quick = T.c4_growth_ratio(prefill(512, 0.1, 0.1), prefill(2048, 0.4, 0.8))
    assert quick.value == pytest.approx(1.0) and T.judge(T.BY_KEY["c4_growth_ratio"], quick)[0] == T.NOT_AT_SIZE
    full = T.c4_growth_ratio(prefill(1024, 0.1, 0.1), prefill(8192, 0.8, 2.0))
    assert T.judge(T.BY_KEY["c4_growth_ratio"], full)[0] == T.PASS
    assert T.judge(T.BY_KEY["c4_vs_phi3_8k"], T.c4_vs_phi3(prefill(8192, 0.8, 2.0)))[0] == T.PASS
    assert T.judge(T.BY_KEY["c4_vs_phi3_8k"], T.c4_vs_phi3(prefill(2048, 0.4, 0.8)))[0] == T.NOT_AT_SIZE
    step = {"batch": 8, "context": 4096, "samples_s": {"sambay": [1.0, 1.1, 0.9], "phi3": [2.0, 2.2, 1.8]}}
    assert T.c6_tps_ratio(step, 8).value == pytest.approx(2.0)
    assert T.judge(T.BY_KEY["c6_tps_ratio_b8"], T.c6_tps_ratio(step, 8))[0] == T.PASS
    assert T.judge(T.BY_KEY["c6_tps_ratio_b8"], T.c6_tps_ratio({**step, "context": 2048}, 8))[0] == T.NOT_AT_SIZE


class _Fake:
    """Stands in for the measured subjects: each take of a decode point returns the next batch of samples."""

    def __init__(self, batches):
        self.batches, self.takes = list(batches), 0

    def __call__(self, key):
        self.takes += 1
        s, p = self.batches.pop(0)
        return {"batch": key[1], "context": key[2], "samples_s": {"sambay": list(s), "phi3": list(p)}}


def _runner(run, fake, rounds):
    m = run.Measurements({"rounds": rounds}, [], lambda msg: None)
    m._take = fake
    est = {"c6_tps_ratio_b8": ("c6", lambda m: run.T.c6_tps_ratio(m("decode", 8, 4096), 8))}
    errors = {}
    return run.judge_all(["c6_tps_ratio_b8"], est, m, rounds, lambda msg: None, errors), errors


def test_inconclusive_ratios_are_repeated_before_giving_up(bench_scripts):
    run, _ = bench_scripts
    straddling = ([0.5, 2.5, 0.7], [1.0, 1.0, 1.0])  # sambay/phi3 tokens/s: 2.0, 0.4, 1.4 -> straddles 1
    tight = ([0.5] * 20, [1.0] * 20)
    fake = _Fake([straddling, tight])
    verdicts, errors = _runner(run, fake, rounds=2)
    v = verdicts["c6_tps_ratio_b8"]
    assert errors == {} and fake.takes == 2 and v["verdict"] == "PASS" and v["repeats"] == 23
    # still straddling after every extra round: INCONCLUSIVE, with the interval in the reason
    fake = _Fake([straddling] * 3)
    v = _runner(run, fake, rounds=2)[0]["c6_tps_ratio_b8"]
    assert fake.takes == 3 and v["verdict"] == "INCONCLUSIVE" and "straddles 1" in v["reason"]
    assert v["repeats"] == 9


def test_check_makes_the_exit_status_follow_the_verdicts(bench_scripts):
    run, _ = bench_scripts
    v = {"a": {"verdict": "PASS"}, "b": {"verdict": "NOT MEASURED AT TARGET SIZE"}}
    assert run.exit_status(v, {}, check=True) == 0
    assert run.exit_status({**v, "c": {"verdict": "INCONCLUSIVE"}}, {}, check=True) == 3
    assert run.exit_status({**v, "c": {"verdict": "INCONCLUSIVE"}, "d": {"verdict": "MISSED"}}, {}, check=True) == 1
    assert run.exit_status({"d": {"verdict": "MISSED"}}, {}, check=False) == 0
    assert run.exit_status(v, {"c3": "RuntimeError: x"}, check=False) == 1


# ----------------------------------------------------------------------------------------- benchmarks/
@pytest.mark.slow
def test_targets_run_end_to_end_on_the_tiny_config(bench_scripts, tmp_path, capsys):
    pytest.importorskip("transformers")
    run, T = bench_scripts
    threads = torch.get_num_threads()
    try:
        assert run.main(["--tiny", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["errors"] == {}
    assert set(r["verdicts"]) == {t.key for t in T.of("C")}  # run.py judges the C targets of the one table
    for key, v in r["verdicts"].items():
        assert key in out and v["verdict"] in (T.PASS, T.MISSED, T.INCONCLUSIVE, T.NOT_AT_SIZE), (key, v)
        assert v["interval"][0] <= v["value"] <= v["interval"][1] or v["verdict"] == T.INCONCLUSIVE, (key, v)
    # the tiny sizes are not the targets' sizes: nothing timed may be judged
    assert r["verdicts"]["c1_slope_ratio"]["verdict"] == T.NOT_AT_SIZE
    assert r["verdicts"]["c4_vs_phi3_8k"]["verdict"] == T.NOT_AT_SIZE
    assert r["verdicts"]["c2_ratio_32k"]["verdict"] == T.PASS  # exact bytes of the released config
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("decode_step_vs_context", "throughput_vs_batch", "prefill_vs_prompt", "latency_vs_generation"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_gpu_script_runs_on_cpu_with_a_tiny_model(bench_scripts, tmp_path, capsys):
    """benchmarks.bench_gpu cannot be timed without a GPU; this runs its code paths on the tiny config."""
    pytest.importorskip("transformers")
    from benchmarks import bench_gpu

    argv = ["--tiny", "--device", "cpu", "--repeats", "2", "--steps", "2", "--batch", "4", "--out", str(tmp_path)]
    assert bench_gpu.main(argv) == 0
    r = json.loads((tmp_path / "gpu_results.json").read_text())
    for key in ("g1_ratio_to_floor", "g2_ratio", "g3_tps_ratio"):
        assert _finite(r["verdicts"][key]["value"]), key
        assert r["verdicts"][key]["verdict"] == "NOT MEASURED AT TARGET SIZE", key  # tiny sizes judge nothing
    out = capsys.readouterr().out
    assert all(g in out for g in ("G1", "G2", "G3", "G6"))
    for n, g5 in r["g5"].items():  # the decode attention's bytes per step, beside the ideal (K and V once)
        assert g5["ideal_bytes"] > 0 and 1.0 <= g5["ratio"] < 1.2, (n, g5)


def test_cache_seek_declares_positions_written_and_leaves_buffers_alone():
    """Benchmarks set a random decode state to a length with ``cache.seek`` (never by assigning length)."""
    from sambay import SambaYCache

    cfg = SambaYConfig.from_dict(sb.load_config(TINY))
    cache = SambaYCache(cfg, 2, 16)
    for layer in cache.layers:
        for t in vars(layer).values() if layer is not None else ():
            t.normal_()
    before = [t.clone() for layer in cache.layers if layer is not None for t in vars(layer).values()]
    cache.seek(5)
    assert cache.length == 5 and cache.pos.tolist() == [5]
    assert cache.valid[:, :5].all() and not cache.valid[:, 5:].any()
    after = [t for layer in cache.layers if layer is not None for t in vars(layer).values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(ValueError, match="max_length=16"):
        cache.seek(17)
