"""GPU targets of PERFORMANCE.md (G1, G2, G3, G6) in one short run: the released config in bf16 with random
weights, against a same-shape ``transformers.Phi3ForCausalLM`` for G3.

    python benchmarks/bench_gpu.py                  # CUDA; a few minutes including start-up
    python benchmarks/bench_gpu.py --tiny --device cpu   # smoke test of this script on a CPU (tiny model)

What it measures (medians of interleaved repeats, ``torch.cuda.synchronize`` around each timed block):
  copy bandwidth  dst.copy_(src) on 1 GiB: bytes read + written per second (the floor's yardstick).
  G1  batch-1 decode step at 4K context over the memory-bandwidth floor (weights + decode state read once
      per step at the measured copy bandwidth). Target <= 1.4. PERFORMANCE.md quotes H200 ~2.35 ms, A100 ~5.5.
  G2  batch-1 decode step at 32K over at 4K. Target <= 1.25.
  G3  batch-16 decode tokens/s at 32K context, sambay over the baseline. Target >= 2.5. The baseline's
      KV cache at 32K is 5 GiB per sequence (80 GiB at batch 16): when it does not fit in the free memory
      the baseline runs at the largest batch that fits, and the script says so (a memory-bound transformer
      cannot serve more sequences; the ratio is then per-GPU throughput at each model's feasible batch).
  G6  CUDA-graph decode over the library's eager decode at batch 1: the static decode step
      (``static=True``) captured once and replayed as the real decode. Target >= 2. ``--compile`` also
      times torch.compile (no CUDA graphs, dynamic shapes) of the eager step; compilation takes minutes,
      so it is off by default.
G4 (fused kernels) is benchmarks/bench_kernels.py; G5 (K/V bytes per step) is not measured here.
Results: a table on stdout and ``gpu_results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from sambay import cache_nbytes
from sambay.bench import models
from sambay.bench.drivers import Phi3Driver, SambaYDriver
from sambay.bench.presets import RELEASED, TINY
from sambay.bench.timing import Progress, describe, interleaved, machine, synchronize

GiB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny model and contexts (a smoke test of the script)")
    p.add_argument(
        "--contexts", default="4096,32768", help="short,long context for G1/G2/G3 (default 4096,32768)"
    )
    p.add_argument("--batch", type=int, default=16, help="G3 batch size (default 16)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timed block (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the eager step (slow)")
    p.add_argument("--no-baseline", action="store_true", help="skip G3 (no transformers needed)")
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.85,
        help="share of the free GPU memory the run may plan to use (default 0.85)",
    )
    p.add_argument("--out", default="bench-results", help="directory for gpu_results.json")
    args = p.parse_args(argv)
    try:
        short, long = (int(x) for x in args.contexts.split(","))
    except ValueError:
        p.error(f"--contexts: expected two integers 'short,long', got {args.contexts!r}")
    if not 1 <= short < long:
        p.error(f"--contexts: expected 1 <= short < long, got {short},{long}")
    if args.batch < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--batch, --steps and --repeats must be >= 1")
    if not 0.1 <= args.memory_fraction <= 0.95:
        p.error("--memory-fraction: expected a value in [0.1, 0.95]")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use --tiny --device cpu for a smoke test)")
    if args.tiny:
        short, long = min(short, 256), min(long, 1024)
    args.short, args.long = short, long
    return args


def free_memory(device) -> int:
    if torch.device(device).type != "cuda":
        return 1 << 62
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def copy_bandwidth(device, progress) -> float:
    """Bytes read + written per second by dst.copy_(src) on 1 GiB (CPU: 64 MiB)."""
    n = (GiB if torch.device(device).type == "cuda" else 64 * 2**20) // 2
    buf = torch.randn(2, n, device=device, dtype=torch.bfloat16)  # [src, dst]
    t = interleaved({"copy": lambda: buf[1].copy_(buf[0])}, repeats=10, inner=5, warmup=3, device=device)[
        "copy"
    ]
    bw = 2 * n * 2 / statistics.median(t)
    progress(f"copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")
    return bw


def step_time(drivers: dict, batch: int, context: int, args, device) -> dict:
    """Median seconds per decode step for each driver, interleaved, from random state at ``context``."""
    cap = context + 2 + args.repeats * args.steps + 1
    states = {n: d.random_state(batch, context, cap) for n, d in drivers.items()}
    fns = {n: (lambda d=d, s=states[n]: d.step(s)) for n, d in drivers.items()}
    t = interleaved(fns, args.repeats, inner=args.steps, warmup=2, device=device)
    del states, fns
    free_memory(device)
    return {n: statistics.median(v) for n, v in t.items()}


def graph_decode(driver: SambaYDriver, context: int, args, device, progress) -> dict:
    """G6: the static decode step (``static=True``: position read from ``cache.pos``, shapes independent of
    it) captured once in a CUDA graph and replayed as the real decode (each replay advances ``cache.pos``),
    against the library's eager decode step, batch 1, both starting at ``context``."""
    from sambay.generation import decode_one_token

    model = driver.model
    room = context + (args.repeats + 4) * args.steps + 8
    eager_state = driver.random_state(1, context, room)
    graph_state = driver.random_state(1, context, room)
    cache, token = graph_state.cache, graph_state.token.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(2):
            decode_one_token(model, token, cache, static=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_one_token(model, token, cache, static=True)
    cache.length -= 1  # capture ran the Python side (length += 1) but no kernel (pos unchanged)

    def eager():
        driver.step(eager_state)

    def graphed():
        graph.replay()
        cache.length += 1

    t = interleaved({"eager": eager, "graph": graphed}, args.repeats, inner=args.steps, warmup=2, device=device)
    med = {k: statistics.median(v) for k, v in t.items()}
    progress(f"G6 at {context}: eager {1e3 * med['eager']:.2f} ms, CUDA graph {1e3 * med['graph']:.2f} ms")
    return {"eager_s": med["eager"], "graph_s": med["graph"], "speedup": med["eager"] / med["graph"]}


def compiled_step(driver: SambaYDriver, context: int, args, device, progress) -> dict:
    from sambay.generation import decode_one_token

    fn = torch.compile(decode_one_token, mode="max-autotune-no-cudagraphs", dynamic=True)
    state = driver.random_state(1, context, context + 2 + 2 * (args.repeats + 2) * args.steps)
    t0 = time.perf_counter()
    for _ in range(3):
        state.token = fn(driver.model, state.token, state.cache).argmax(-1)
    synchronize(device)
    compile_s = time.perf_counter() - t0
    eager_state = driver.random_state(1, context, context + 2 + (args.repeats + 2) * args.steps)

    def compiled():
        state.token = fn(driver.model, state.token, state.cache).argmax(-1)

    t = interleaved(
        {"eager": lambda: driver.step(eager_state), "compiled": compiled},
        args.repeats,
        inner=args.steps,
        warmup=2,
        device=device,
    )
    med = {k: statistics.median(v) for k, v in t.items()}
    progress(
        f"torch.compile: first calls {compile_s:.0f} s; eager {1e3 * med['eager']:.2f} ms, compiled "
        f"{1e3 * med['compiled']:.2f} ms"
    )
    return {
        "compile_s": compile_s,
        "eager_s": med["eager"],
        "compiled_s": med["compiled"],
        "speedup": med["eager"] / med["compiled"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    progress = Progress()
    info = machine(device, torch.get_num_threads())
    progress(describe(info))
    config, dtype = (TINY, torch.float32) if args.tiny else (RELEASED, torch.bfloat16)
    results: dict = {"machine": info, "contexts": [args.short, args.long], "batch": args.batch, "errors": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def guarded(key, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- OOM or a failed capture: record, free, go on
            results["errors"][key] = f"{type(e).__name__}: {e}"
            progress(f"{key} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            free_memory(device)
            return None

    bw = copy_bandwidth(device, progress)
    results["copy_bandwidth_bytes_per_s"] = bw
    with torch.inference_mode():
        sambay = SambaYDriver(models.build_sambay(config, dtype, device))
        weight_bytes = sum(p.numel() * p.element_size() for p in sambay.model.parameters())
        progress(f"sambay built: {weight_bytes / 1e9:.2f} GB of weights ({models.shape_summary(config)})")
        cfg = sambay.model.config

        def floor_s(batch, context):
            return (weight_bytes + cache_nbytes(cfg, batch, context, dtype)) / bw

        # G1, G2: batch-1 decode at the short and the long context
        b1 = {}
        for N in (args.short, args.long):
            r = guarded(
                f"decode_b1_{N}", lambda N=N: step_time({"sambay": sambay}, 1, N, args, device)["sambay"]
            )
            if r is not None:
                b1[N] = r
                progress(
                    f"batch-1 decode at {N}: {1e3 * r:.3f} ms/token (floor {1e3 * floor_s(1, N):.3f} ms)"
                )
        results["decode_b1_s"] = b1
        if args.short in b1:
            results["g1_ratio_to_floor"] = b1[args.short] / floor_s(1, args.short)
            results["g1_floor_s"] = floor_s(1, args.short)
        if args.short in b1 and args.long in b1:
            results["g2_ratio"] = b1[args.long] / b1[args.short]

        # G6: graph replay vs eager at the short context (CUDA only)
        if torch.device(device).type == "cuda":
            g6 = guarded("g6", lambda: graph_decode(sambay, args.short, args, device, progress))
            if g6:
                results["g6"] = g6
                results["g6_graph_speedup"] = g6["speedup"]
            if args.compile:
                c = guarded("compile", lambda: compiled_step(sambay, args.short, args, device, progress))
                if c:
                    results["compile"] = c

        # G3: batch-B decode at the long context against the baseline
        if not args.no_baseline:
            try:
                models.import_transformers()
            except models.MissingDependency as e:
                results["errors"]["g3"] = str(e)
                progress(f"G3 skipped: {e}")
            else:
                g3 = guarded("g3", lambda: g3_throughput(sambay, config, dtype, args, device, progress))
                if g3:
                    results["g3"] = g3
                    results["g3_tps_ratio"] = g3["tps_ratio"]
    print_table(results, args)
    with open(out / "gpu_results.json", "w", encoding="utf-8") as f:
        json.dump(_finite(results), f, indent=2)
    print(f"results: {out / 'gpu_results.json'} (wall time {progress.elapsed():.0f} s)")
    return 1 if results["errors"] else 0


def g3_throughput(sambay: SambaYDriver, config, dtype, args, device, progress) -> dict:
    baseline = Phi3Driver(models.build_baseline(config, dtype, device))
    pc = baseline.config
    hd = pc.hidden_size // pc.num_attention_heads
    per_seq = (
        pc.num_hidden_layers * pc.num_key_value_heads * hd * 2 * torch.finfo(dtype).bits // 8 * args.long
    )
    budget = free_memory(device) * args.memory_fraction
    sambay_state = cache_nbytes(sambay.model.config, args.batch, args.long, dtype)
    # the baseline's batch: the requested one if its KV (+ one layer's random fill) fits next to sambay's state
    bb = args.batch
    while bb > 1 and bb * per_seq * (1 + 1 / pc.num_hidden_layers) + sambay_state > budget:
        bb //= 2
    note = (
        ""
        if bb == args.batch
        else (
            f"baseline at batch {bb}: batch {args.batch} needs "
            f"{args.batch * per_seq / GiB:.1f} GiB of KV cache, {budget / GiB:.1f} GiB free"
        )
    )
    if note:
        progress("G3: " + note)
    if bb == args.batch:
        t = step_time({"sambay": sambay, "phi3": baseline}, args.batch, args.long, args, device)
        ts, tb = t["sambay"], t["phi3"]
    else:
        ts = step_time({"sambay": sambay}, args.batch, args.long, args, device)["sambay"]
        tb = step_time({"phi3": baseline}, bb, args.long, args, device)["phi3"]
    tps_s, tps_b = args.batch / ts, bb / tb
    progress(
        f"G3 at {args.long}: sambay batch {args.batch} {tps_s:.1f} tok/s, baseline batch {bb} {tps_b:.1f} tok/s"
    )
    del baseline
    free_memory(device)
    return {
        "sambay_batch": args.batch,
        "baseline_batch": bb,
        "sambay_step_s": ts,
        "baseline_step_s": tb,
        "sambay_tokens_per_s": tps_s,
        "baseline_tokens_per_s": tps_b,
        "tps_ratio": tps_s / tps_b,
        "note": note,
        "baseline_kv_bytes_per_sequence": per_seq,
    }


def _verdict(value, ok) -> str:
    if value is None or not math.isfinite(value):
        return "NO DATA"
    return "PASS" if ok(value) else "MISSED"


def print_table(r: dict, args) -> None:
    rows = [
        (
            "G1",
            f"decode b1 @{args.short} / bandwidth floor",
            r.get("g1_ratio_to_floor"),
            "<= 1.4",
            lambda v: v <= 1.4,
        ),
        ("G2", f"decode b1 @{args.long} / @{args.short}", r.get("g2_ratio"), "<= 1.25", lambda v: v <= 1.25),
        (
            "G3",
            f"tokens/s b{args.batch} @{args.long}, sambay/baseline",
            r.get("g3_tps_ratio"),
            ">= 2.5",
            lambda v: v >= 2.5,
        ),
    ]
    print(f"\nsambay GPU targets -- {describe(r['machine'])}")
    print(f"{'id':4}{'metric':46}{'value':>10}  {'target':9}verdict")
    for id_, what, v, spec, ok in rows:
        print(f"{id_:4}{what:46}{(f'{v:.3f}' if v is not None else 'n/a'):>10}  {spec:9}{_verdict(v, ok)}")
    g6 = r.get("g6_graph_speedup")
    print(f"{'G6':4}{'CUDA-graph / eager decode b1':46}{(f'{g6:.3f}' if g6 else 'n/a'):>10}  {'>= 2':9}"
          f"{_verdict(g6, lambda v: v >= 2)}")
    if "compile" in r:
        c = r["compile"]
        print(
            f"    torch.compile (no graphs): x{c['speedup']:.2f} over eager, {c['compile_s']:.0f} s to compile"
        )
    if r.get("g1_floor_s"):
        print(
            f"G1 floor: {1e3 * r['g1_floor_s']:.3f} ms/token at {r['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; "
            f"measured {1e3 * r['decode_b1_s'][args.short]:.3f} ms/token"
        )
    if r.get("g3", {}).get("note"):
        print("G3 note: " + r["g3"]["note"])
    if r["errors"]:
        print("ERRORS: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()))


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
