"""`sambay bench`: run the sections, print the table, write results.json and the plots."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from sambay.bench import decode, memory, models, plots, prefill, report
from sambay.bench.drivers import Phi3Driver, SambaYDriver
from sambay.bench.presets import make_plan
from sambay.bench.timing import Progress, describe, machine, noisy

SECTIONS = ("c1", "c2", "c3", "c4", "c5", "c6", "c7", "latency")
NEEDS_BASELINE = {"c1", "c4", "c6", "latency"}
NEEDS_MODEL = {"c1", "c3", "c4", "c5", "c6", "latency"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="fewer, shorter points (about a minute on a 2-core CPU)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="cpu: scaled config in fp32; cuda: the released config in bf16 (default: cuda if available)",
    )
    parser.add_argument("--out", default="bench-results", help="directory for results.json and the plots")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch.set_num_threads (default 2); with 2+ threads and OMP_WAIT_POLICY unset, the run "
        "happens in a child process with OMP_WAIT_POLICY=PASSIVE (no OpenMP stalls on a busy "
        "machine)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats per point (default: by mode)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: a tiny model, seconds


def _parse_only(only: str | None) -> list[str]:
    if not only:
        return list(SECTIONS)
    wanted = [s.strip().lower() for s in only.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        raise ValueError(f"--only: unknown section(s) {bad}; expected some of {','.join(SECTIONS)}")
    return [s for s in SECTIONS if s in wanted]


def run(args: argparse.Namespace) -> int:
    try:
        sections = _parse_only(args.only)
        if args.threads < 1:
            raise ValueError(f"--threads: expected >= 1, got {args.threads}")
        if args.repeats is not None and args.repeats < 1:
            raise ValueError(f"--repeats: expected >= 1, got {args.repeats}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
    except ValueError as e:
        print(f"sambay bench: {e}", file=sys.stderr)
        return 2
    if NEEDS_BASELINE & set(sections):
        try:
            models.import_transformers()
        except models.MissingDependency as e:
            print(f"sambay bench: {e}", file=sys.stderr)
            return 2
    if args.threads > 1 and not os.environ.get("OMP_WAIT_POLICY"):
        return _respawn_with_passive_omp(args)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, sections, device)
    finally:
        torch.set_num_threads(threads_before)  # in-process callers (tests) get their setting back


def _respawn_with_passive_omp(args: argparse.Namespace) -> int:
    """Run the benchmark in a child process with OMP_WAIT_POLICY=PASSIVE (read by OpenMP only when torch is
    loaded, hence the new process). With the default spin-waiting, OpenMP threads that share their cores with
    any other process stall at every barrier: on a busy 2-core machine a 25 ms decode step took 0.3-3 s.
    Passive waiting costs a little on an idle machine and removes the stalls; both models run under it.
    Set OMP_WAIT_POLICY yourself to choose otherwise (then no child process is started)."""
    argv = [
        sys.executable,
        "-m",
        "sambay.cli",
        "bench",
        "--threads",
        str(args.threads),
        "--out",
        str(args.out),
    ]
    for flag in ("quick", "no_plots", "tiny"):
        if getattr(args, flag, False):
            argv.append("--" + flag.replace("_", "-"))
    for opt in ("device", "repeats", "only"):
        if getattr(args, opt, None) is not None:
            argv += ["--" + opt, str(getattr(args, opt))]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    root = str(Path(__file__).resolve().parents[2])  # the child imports this same sambay
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print(
        "sambay bench: running with OMP_WAIT_POLICY=PASSIVE in a child process (see --help)",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    return subprocess.call(argv, env=env)


def _run(args: argparse.Namespace, sections: list[str], device: str) -> int:
    plan = make_plan(args.quick, device, getattr(args, "tiny", False))
    if args.repeats is not None:
        plan = dataclasses.replace(plan, repeats=args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    info = machine(device, args.threads)
    dtype = getattr(torch, plan.dtype)
    progress(f"sambay bench ({plan.name}): {describe(info)}")
    load = info.get("loadavg_start", [0.0])[0]
    if load > 0.75 * (os.cpu_count() or 1):
        progress(
            f"note: load average {load} on {os.cpu_count()} CPUs at the start (other processes, or a run that "
            f"just ended): times may be noisy; interleaving keeps the ratios comparable"
        )
    progress(f"model shape: {models.shape_summary(plan.model)}, {plan.dtype}; sections: {','.join(sections)}")

    targets, raw, errors = {}, {}, {}
    drivers = sambay = None
    if NEEDS_MODEL & set(sections):
        sambay = SambaYDriver(models.build_sambay(plan.model, dtype, device))
        drivers = [sambay]
        if NEEDS_BASELINE & set(sections):
            drivers.append(Phi3Driver(models.build_baseline(plan.model, dtype, device)))
        raw["params"] = {d.name: models.num_params(d.model) for d in drivers}
        progress(
            "built with random weights: "
            + ", ".join(f"{n} {p / 1e6:.1f}M parameters" for n, p in raw["params"].items())
        )

    def section(key: str, fn):
        if key not in sections:
            return
        try:
            with torch.inference_mode():
                result = fn()
        except Exception as e:  # noqa: BLE001 -- one failed section must not lose the others
            errors[key] = f"{type(e).__name__}: {e}"
            progress(f"{key} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            return
        targets.update(result["targets"])
        raw[key] = result["raw"]

    section("c2", lambda: memory.decode_state_bytes(progress))
    section("c1", lambda: decode.decode_vs_context(drivers, plan, device, progress))
    section("c5", lambda: decode.ring_after_wraps(sambay, plan, device, progress))
    section("c6", lambda: decode.throughput_vs_batch(drivers, plan, device, progress))
    section(
        "latency",
        lambda: decode.latency_vs_generation(
            drivers, plan, device, progress, fits=raw.get("c1", {}).get("fit")
        ),
    )
    section("c3", lambda: prefill.yoco_skip(sambay, plan, device, progress))
    section("c4", lambda: prefill.prefill_vs_length(drivers, plan, device, progress))
    drivers = sambay = None  # free the timed models before C7 builds its checkpoint
    decode.free_memory()
    section("c7", lambda: memory.load_peak_rss(plan, args.threads, progress))

    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    settings = {
        **dataclasses.asdict(plan),
        "device": device,
        "threads": args.threads,
        "sections": sections,
        "baseline": "transformers.Phi3ForCausalLM, sdpa; decode from a StaticCache sized to the context, "
        "prefill with DynamicCache",
        "decode_state": "random values at the given context length (no prefill)",
    }
    raw["spreads"] = progress.spreads
    results = report.build_results(targets, raw, info, settings, errors, progress.elapsed())
    names = ("sambay", models.BASELINE_NAME)
    header = (
        f"sambay bench ({plan.name}, {device}, {plan.dtype}, {args.threads} threads) -- "
        f"{models.shape_summary(plan.model)}\n{describe(info)}"
    )
    if "params" in raw:
        header += "\nparameters: " + ", ".join(f"{n} {p / 1e6:.1f}M" for n, p in raw["params"].items())
    print(report.table(results, names, header))
    if "latency" in raw and "extrapolated" in raw["latency"]:
        e = raw["latency"]["extrapolated"]
        print(
            f"latency plot: extrapolated from the C1 fits, {e['lengths'][-1]} generated tokens take "
            f"{e['ratio_at_long']:.2f}x the baseline's time (measured up to {raw['latency']['lengths'][-1]})"
        )
    bad = noisy(progress.spreads)
    if bad:
        worst = max(bad, key=lambda s: s["spread"])
        print(
            f"noise: {len(bad)} of {len(progress.spreads)} timed points have repeats more than 1.5x apart (worst: "
            f"{worst['point']} {worst['subject']} {1e3 * worst['min_s']:.1f}..{1e3 * worst['max_s']:.1f} ms); "
            f"load average {info.get('loadavg_start', ['?'])[0]} -> {info.get('loadavg_end', ['?'])[0]}: "
            f"treat those points with care"
        )
    if errors:
        print("ERRORS: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    if not args.no_plots:
        if plots.have_matplotlib():
            written = plots.make_plots(
                raw,
                out,
                f"{plan.name}, {plan.dtype}, {args.threads} threads: {models.short_shape(plan.model)}",
            )
            results["plots"] = [p.name for p in written]
            if written:
                print("plots: " + ", ".join(str(p) for p in written))
        else:
            print("plots skipped: matplotlib is not installed (pip install 'sambay[bench]')")
    report.write_results(out / "results.json", results)
    print(f"results: {out / 'results.json'} (wall time {progress.elapsed():.1f} s)")
    return 1 if errors else 0
