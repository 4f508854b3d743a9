"""``sambay bench``: decode steps, prefills and decode-state bytes of sambay side by side with a same-shape
``transformers.Phi3ForCausalLM`` (random weights, same process, dtype and threads, interleaved); a table of
the medians and sambay/phi3 ratios with 95% intervals over the repeats, and ``results.json``. The project's
targets and verdicts are in benchmarks/ of the repository, built on these measurements."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from sambay.bench.measure import (
    decode_state_bytes,
    decode_step_seconds,
    decode_step_seconds_vs_context,
    prefill_seconds,
)
from sambay.bench.subjects import CONFIGS, Phi3, SambaY, load_config, num_params, shape
from sambay.bench.timing import describe, machine, median, ratio
from sambay.bench.workers import worker_env, write_json

# Sizes per (device, --quick). CPU: the scaled config (the released layer pattern at hidden 256), fp32.
PLANS = {
    ("cpu", True): {"config": "sambay-scaled-cpu", "dtype": "float32", "contexts": "512,4096,16384",
                    "batches": "1,8", "prompts": "512,2048", "repeats": 5, "steps": 1},
    ("cpu", False): {"config": "sambay-scaled-cpu", "dtype": "float32", "contexts": "512,2048,8192,16384,32768",
                     "batches": "1,8,16", "prompts": "1024,2048,8192", "repeats": 7, "steps": 2},
    ("cuda", True): {"config": "phi4-mini-flash-reasoning", "dtype": "bfloat16", "contexts": "512,4096,16384",
                     "batches": "1,8", "prompts": "1024,8192", "repeats": 5, "steps": 8},
    ("cuda", False): {"config": "phi4-mini-flash-reasoning", "dtype": "bfloat16",
                      "contexts": "512,4096,16384,32768", "batches": "1,8,16", "prompts": "1024,2048,8192",
                      "repeats": 7, "steps": 8},
}
BATCH_CONTEXT = 4096  # the context of the decode-vs-batch measurements


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer, shorter points")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--config", default=None, help=f"one of {', '.join(CONFIGS)} or a config.json path "
                   "(default: scaled on cpu, released on cuda)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--contexts", default=None, help="batch-1 decode contexts, e.g. 512,4096")
    p.add_argument("--batches", default=None, help=f"decode batch sizes at context {BATCH_CONTEXT}")
    p.add_argument("--prompts", default=None, help="prefill lengths")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per point")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2); with 2+ and OMP_WAIT_POLICY "
                   "unset, the run happens in a child process with OMP_WAIT_POLICY=PASSIVE")
    p.add_argument("--out", default="bench-results", help="directory for results.json")


def _ints(option: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--{option}: expected comma-separated integers >= 1, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = {**PLANS[(device, args.quick)], **{k: v for k, v in vars(args).items() if k in PLANS[("cpu", True)]
                                               and v is not None}}
    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if args.threads < 1 or plan["repeats"] < 1:
            raise ValueError(f"--threads and --repeats: expected >= 1, got {args.threads} and {plan['repeats']}")
        sizes = {k: _ints(k, plan[k]) for k in ("contexts", "batches", "prompts")}
        config = load_config(plan["config"])
    except (ValueError, FileNotFoundError) as e:
        print(f"sambay bench: {e}", file=sys.stderr)
        return 2
    if args.threads > 1 and not os.environ.get("OMP_WAIT_POLICY"):
        return _respawn_with_passive_openmp(args)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, device, plan, sizes, config)
    finally:
        torch.set_num_threads(threads_before)  # in-process callers (tests) get their setting back


def _run(args: argparse.Namespace, device: str, plan: dict, sizes: dict, config: dict) -> int:
    start = time.perf_counter()
    dtype = getattr(torch, plan["dtype"])
    try:
        subjects = [SambaY(config, dtype, device), Phi3(config, dtype, device)]
    except ImportError as e:
        print(f"sambay bench: {e}", file=sys.stderr)
        return 2
    info = machine(device, args.threads)
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"{describe(info)}\nmodel: {shape(config)}, {plan['dtype']}")
    R, steps = plan["repeats"], plan["steps"]
    decode = decode_step_seconds_vs_context(subjects, sizes["contexts"], R, steps)["points"]
    for d in decode:
        log(f"decode step, batch 1, context {d['context']}: {_side_by_side(d['samples_s'])}")
    for batch in sizes["batches"]:
        if batch == 1 and BATCH_CONTEXT in sizes["contexts"]:
            continue
        decode.append(decode_step_seconds(subjects, batch, BATCH_CONTEXT, R, steps))
        log(f"decode step, batch {batch}, context {BATCH_CONTEXT}: {_side_by_side(decode[-1]['samples_s'])}")
    prefill = []
    for tokens in sizes["prompts"]:
        prefill.append(prefill_seconds(subjects, tokens, max(2, R // 2)))
        log(f"prefill {tokens} tokens: {_side_by_side(prefill[-1]['samples_s'])}")
    state = decode_state_bytes(config, sizes["contexts"], dtype)
    from sambay.kernels import active_backends

    results = {"machine": info, "backends": active_backends(device),
               "settings": {**plan, "device": device, "threads": args.threads, "model": shape(config),
                                             "baseline": "transformers.Phi3ForCausalLM (sdpa), same shape"},
               "params": {s.name: num_params(s.model) for s in subjects},
               "decode": decode, "prefill": prefill, "decode_state": state,
               "wall_s": time.perf_counter() - start}
    print(table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    print(f"results: {out / 'results.json'} (wall time {results['wall_s']:.0f} s)")
    return 0


def _side_by_side(samples: dict) -> str:
    return ", ".join(f"{n} {1e3 * median(v):.2f} ms" for n, v in samples.items())


def table(results: dict) -> str:
    """The measurements side by side: medians, and sambay/phi3 with its 95% interval over the repeats."""
    rows = [("measurement", "sambay", "phi3", "sambay/phi3 [95% interval]")]
    for d in results["decode"]:
        rows.append((f"decode step, batch {d['batch']}, context {d['context']}", *_cells(d["samples_s"])))
    for p in results["prefill"]:
        rows.append((f"prefill, {p['tokens']} tokens", *_cells(p["samples_s"])))
    s = results["decode_state"]
    for n, ours, theirs in zip(s["contexts"], s["formula_bytes"], s["same_shape_kv_bytes"]):
        rows.append((f"decode state bytes, context {n} ({s['dtype']})", f"{ours / 2**20:.1f} MiB",
                     f"{theirs / 2**20:.1f} MiB", f"{ours / theirs:.4f} (exact)"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"sambay bench: {results['settings']['model']}, {results['settings']['dtype']}, "
             f"{results['settings']['device']}, {results['settings']['threads']} threads; "
             f"times are medians of {results['settings']['repeats']} interleaved repeats (prefill: fewer)",
             "sambay backends: " + ", ".join(f"{k}={v}" for k, v in results.get("backends", {}).items())]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cells(samples: dict) -> tuple[str, str, str]:
    r = ratio(samples["sambay"], samples["phi3"])
    lo, hi = r["interval"]
    return (_ms(median(samples["sambay"])), _ms(median(samples["phi3"])), f"{r['value']:.3f} [{lo:.3f}, {hi:.3f}]")


def _ms(s: float) -> str:
    return f"{1e3 * s:.2f} ms" if s < 1 else f"{s:.3f} s"


def _respawn_with_passive_openmp(args: argparse.Namespace) -> int:
    """Run in a child process with OMP_WAIT_POLICY=PASSIVE (OpenMP reads it when torch loads, hence the new
    process): with the default spin-waiting, OpenMP threads sharing their cores with any other process stall
    at every barrier (docs/PERFORMANCE.md). Set OMP_WAIT_POLICY yourself to choose otherwise."""
    argv = [sys.executable, "-m", "sambay.cli", "bench"]
    for key, value in vars(args).items():
        if key in ("func", "command") or value is None or value is False:
            continue
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    env = worker_env(None, "PASSIVE")  # the child imports this same sambay
    print("sambay bench: running with OMP_WAIT_POLICY=PASSIVE in a child process", file=sys.stderr, flush=True)
    return subprocess.call(argv, env=env)
