"""GPU targets of PERFORMANCE.md (G1, G2, G3, G6) in one short run: the released config in bf16 with random
weights, against a same-shape ``transformers.Phi3ForCausalLM`` for G3.

    python -m benchmarks.bench_gpu                  # CUDA; a few minutes including start-up
    python -m benchmarks.bench_gpu --tiny --device cpu   # smoke test of this script on a CPU (tiny model)

What it measures (medians of interleaved repeats, ``torch.cuda.synchronize`` around each timed block; each
ratio with a 95% bootstrap interval over the repeats, judged by benchmarks/targets.py: INCONCLUSIVE when the
interval straddles the target, NOT MEASURED AT TARGET SIZE off the named sizes, e.g. with --tiny):
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
  G5  K/V bytes per decode step: what the differential decode kernel (sambay.kernels.diff_decode) reads per
      step, summed over the layers (the full and cross layers over the shared K/V, the sliding layers over
      their windows), beside the ideal (every K and V byte once); on CUDA also the kernel's time over the
      shared K/V at the long context and its achieved bandwidth over the measured copy bandwidth.
G4 (fused kernels) is benchmarks/bench_kernels.py.
Results: a table on stdout and ``gpu_results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import sambay.bench as sb
from benchmarks import targets as T
from sambay import cache_nbytes

GiB = 2**30
TINY = Path(__file__).resolve().parents[1] / "configs" / "sambay-tiny.json"
GPU_TARGETS = {t.key: t for t in T.of("G")}


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
    t = sb.interleaved({"copy": lambda: buf[1].copy_(buf[0])}, repeats=10, inner=5, warmup=3, device=device)["copy"]
    bw = 2 * n * 2 / statistics.median(t)
    progress(f"copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")
    return bw


def step_time(subjects: list, batch: int, context: int, args, device) -> dict:
    """Seconds per decode step of each subject, one sample per interleaved repeat, from random state."""
    t = sb.decode_step_seconds(subjects, batch, context, args.repeats, args.steps)["samples_s"]
    free_memory(device)
    return t


def _step(model, token, cache, static=False):
    return model(token[:, None], cache=cache, logits_to_keep=1, static=static).logits[:, -1]


def graph_decode(subject: sb.SambaY, context: int, args, device, progress) -> dict:
    """G6: the static decode step (``static=True``: position read from ``cache.pos``, shapes independent of
    it) captured once in a CUDA graph and replayed as the real decode (each replay advances ``cache.pos``),
    against the library's eager decode step, batch 1, both starting at ``context``."""
    model = subject.model
    room = (args.repeats + 4) * args.steps + 8
    eager_state = subject.random_decode_state(1, context, room)
    cache, token = subject.random_decode_state(1, context, room)["cache"], eager_state["token"].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(2):
            _step(model, token, cache, static=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(model, token, cache, static=True)
    # The capture ran the Python side (which marks the Python count cache.length stale) but no kernel; each
    # replay advances cache.pos and cache.valid on the device, and cache.length is re-read from pos when asked.

    def eager():
        subject.decode_step(eager_state)

    t = sb.interleaved({"eager": eager, "graph": graph.replay}, args.repeats, inner=args.steps, warmup=2,
                       device=device)
    med = {k: statistics.median(v) for k, v in t.items()}
    progress(f"G6 at {context}: eager {1e3 * med['eager']:.2f} ms, CUDA graph {1e3 * med['graph']:.2f} ms")
    return {"eager_s": med["eager"], "graph_s": med["graph"], "speedup": med["eager"] / med["graph"],
            "estimate": _ratio_estimate(t["eager"], t["graph"], f"batch 1, N={context}")}


def compiled_step(subject: sb.SambaY, context: int, args, device, progress) -> dict:
    fn = torch.compile(_step, mode="max-autotune-no-cudagraphs", dynamic=True)
    state = subject.random_decode_state(1, context, 2 + 2 * (args.repeats + 2) * args.steps)
    t0 = time.perf_counter()
    for _ in range(3):
        state["token"] = fn(subject.model, state["token"], state["cache"]).argmax(-1)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    eager_state = subject.random_decode_state(1, context, 2 + (args.repeats + 2) * args.steps)

    def compiled():
        state["token"] = fn(subject.model, state["token"], state["cache"]).argmax(-1)

    t = sb.interleaved(
        {"eager": lambda: subject.decode_step(eager_state), "compiled": compiled},
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


def _ratio_estimate(num: list[float], den: list[float], at: str, at_size: bool = True) -> T.Estimate:
    """median(num) / median(den) of paired samples, with its 95% bootstrap interval."""
    r = sb.ratio(num, den)
    return T.Estimate(r["value"], tuple(r["interval"]), at, at_target_size=at_size)


def kv_bytes_per_step(cfg, args, dtype, device, bw, progress) -> dict:
    """G5: per decode step, the bytes the differential decode kernel moves (summed over the attention layers)
    and the ideal; on CUDA the kernel timed over the shared K/V at the long context."""
    from sambay.kernels.diff_decode import diff_decode, diff_decode_bytes

    Hq, G, D = cfg.num_attention_heads, cfg.num_kv_pairs, cfg.head_dim
    roles = cfg.layer_types
    shared = sum(r in ("full_attention", "cross_attention") for r in roles)
    sliding = sum(r == "sliding_attention" for r in roles)
    out = {}
    for N in (args.short, args.long):
        dev = torch.device(device)
        full = diff_decode_bytes(1, Hq, G, N, D, dtype, device=dev if dev.type == "cuda" else None)
        ring = diff_decode_bytes(1, Hq, G, min(cfg.sliding_window, N), D, dtype,
                                 device=dev if dev.type == "cuda" else None)
        kernel = shared * full.kernel + sliding * ring.kernel
        ideal = shared * full.ideal + sliding * ring.ideal
        out[N] = {"kernel_bytes": kernel, "ideal_bytes": ideal, "ratio": kernel / ideal,
                  "splits_shared": full.num_splits}
        progress(f"G5 at {N}: {kernel / 1e6:.1f} MB read per step by the decode attention vs {ideal / 1e6:.1f} MB "
                 f"ideal ({kernel / ideal:.3f}x; {shared} layers over the shared K/V, {sliding} sliding)")
    if torch.device(device).type == "cuda":
        N = args.long
        q = torch.randn(1, Hq, D, device=device, dtype=dtype)
        k = torch.randn(1, 2, G, N, D, device=device, dtype=dtype)
        v = torch.randn(1, G, N, 2 * D, device=device, dtype=dtype)
        valid = torch.ones(1, N, dtype=torch.bool, device=device)
        lam = torch.tensor(0.3, device=device)
        for _ in range(3):
            diff_decode(q, k, v, valid, lam, D ** -0.5)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            diff_decode(q, k, v, valid, lam, D ** -0.5)
        torch.cuda.synchronize()
        sec = (time.perf_counter() - t) / 20
        moved = diff_decode_bytes(1, Hq, G, N, D, dtype, device=torch.device(device)).kernel
        out["kernel_s_shared_long"] = sec
        out["kernel_bandwidth_over_copy"] = moved / sec / bw
        progress(f"G5 kernel over the shared K/V at {N}: {1e6 * sec:.1f} us, {moved / sec / 1e9:.0f} GB/s "
                 f"({moved / sec / bw:.2f}x the copy bandwidth)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    start = time.perf_counter()

    def progress(msg):
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    info = sb.machine(device, torch.get_num_threads())
    progress(sb.describe(info))
    config = sb.load_config(TINY if args.tiny else "phi4-mini-flash-reasoning")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    from sambay.kernels import active_backends

    backends = active_backends(device)  # which implementation each op family runs (and the probes, once)
    progress(f"backends: {backends}")
    results: dict = {"machine": info, "backends": backends, "contexts": [args.short, args.long], "batch": args.batch,
                     "errors": {}}
    estimates: dict[str, T.Estimate] = {}
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
        sambay = sb.SambaY(config, dtype, device)
        weight_bytes = sum(p.numel() * p.element_size() for p in sambay.model.parameters())
        progress(f"sambay built: {weight_bytes / 1e9:.2f} GB of weights ({sb.shape(config)})")
        cfg = sambay.model.config

        def floor_s(batch, context):
            return (weight_bytes + cache_nbytes(cfg, batch, context, dtype)) / bw

        # G1, G2: batch-1 decode at the short and the long context
        b1 = {}
        for N in (args.short, args.long):
            r = guarded(f"decode_b1_{N}", lambda N=N: step_time([sambay], 1, N, args, device)["sambay"])
            if r is not None:
                b1[N] = r
                progress(f"batch-1 decode at {N}: {1e3 * statistics.median(r):.3f} ms/token "
                         f"(floor {1e3 * floor_s(1, N):.3f} ms)")
        results["decode_b1_s"] = b1
        if args.short in b1:
            f = floor_s(1, args.short)
            results["g1_floor_s"] = f
            estimates["g1_ratio_to_floor"] = T.Estimate(
                statistics.median(b1[args.short]) / f, sb.bootstrap(lambda m: m[0]["s"] / f, [{"s": b1[args.short]}]),
                f"N={args.short}", at_target_size=args.short == 4096)
        if args.short in b1 and args.long in b1:
            estimates["g2_ratio"] = T.Estimate(
                statistics.median(b1[args.long]) / statistics.median(b1[args.short]),
                sb.bootstrap(lambda m: m[1]["s"] / m[0]["s"], [{"s": b1[args.short]}, {"s": b1[args.long]}]),
                f"N={args.short}, {args.long}", at_target_size=(args.short, args.long) == (4096, 32768))

        # G5: bytes the decode attention reads per step, against the ideal
        results["g5"] = guarded("g5", lambda: kv_bytes_per_step(cfg, args, dtype, device, bw, progress))

        # G6: graph replay vs eager at the short context (CUDA only)
        if torch.device(device).type == "cuda":
            g6 = guarded("g6", lambda: graph_decode(sambay, args.short, args, device, progress))
            if g6:
                estimates["g6_graph_speedup"] = g6.pop("estimate")
                results["g6"] = g6
            if args.compile:
                c = guarded("compile", lambda: compiled_step(sambay, args.short, args, device, progress))
                if c:
                    results["compile"] = c

        # G3: batch-B decode at the long context against the baseline
        if not args.no_baseline:
            g3 = guarded("g3", lambda: g3_throughput(sambay, config, dtype, args, device, progress))
            if g3:
                estimates["g3_tps_ratio"] = g3.pop("estimate")
                results["g3"] = g3
    results["verdicts"] = {}
    for key, est in estimates.items():
        verdict, reason = T.judge(GPU_TARGETS[key], est)
        results["verdicts"][key] = {"value": est.value, "interval": list(est.interval),
                                    "measured_at": est.measured_at, "verdict": verdict, "reason": reason}
    print_table(results)
    sb.write_json(out / "gpu_results.json", results)
    print(f"results: {out / 'gpu_results.json'} (wall time {time.perf_counter() - start:.0f} s)")
    return 1 if results["errors"] else 0


def g3_throughput(sambay: sb.SambaY, config, dtype, args, device, progress) -> dict:
    baseline = sb.Phi3(config, dtype, device)
    pc = baseline.config
    hd = pc.hidden_size // pc.num_attention_heads
    per_seq = pc.num_hidden_layers * pc.num_key_value_heads * hd * 2 * torch.finfo(dtype).bits // 8 * args.long
    budget = free_memory(device) * args.memory_fraction
    sambay_state = cache_nbytes(sambay.model.config, args.batch, args.long, dtype)
    # the baseline's batch: the requested one if its KV (+ one layer's random fill) fits next to sambay's state
    bb = args.batch
    while bb > 1 and bb * per_seq * (1 + 1 / pc.num_hidden_layers) + sambay_state > budget:
        bb //= 2
    need = args.batch * per_seq / GiB
    note = "" if bb == args.batch else (f"baseline at batch {bb}: batch {args.batch} needs {need:.1f} GiB of KV "
                                        f"cache, {budget / GiB:.1f} GiB free")
    if note:
        progress("G3: " + note)
    if bb == args.batch:
        t = step_time([sambay, baseline], args.batch, args.long, args, device)
        groups = [t]
    else:
        t = {**step_time([sambay], args.batch, args.long, args, device),
             **step_time([baseline], bb, args.long, args, device)}
        groups = [{"sambay": t["sambay"]}, {"phi3": t["phi3"]}]
    ts, tb = statistics.median(t["sambay"]), statistics.median(t["phi3"])
    tps_s, tps_b = args.batch / ts, bb / tb

    def tps_ratio(m):
        return (args.batch / m[0]["sambay"]) / (bb / m[-1]["phi3"])

    progress(f"G3 at {args.long}: sambay batch {args.batch} {tps_s:.1f} tok/s, baseline batch {bb} {tps_b:.1f} tok/s")
    del baseline
    free_memory(device)
    at = f"batch {args.batch} (phi3 {bb}), N={args.long}"
    return {"sambay_batch": args.batch, "baseline_batch": bb, "sambay_step_s": ts, "baseline_step_s": tb,
            "sambay_tokens_per_s": tps_s, "baseline_tokens_per_s": tps_b, "note": note,
            "baseline_kv_bytes_per_sequence": per_seq,
            "estimate": T.Estimate(tps_s / tps_b, sb.bootstrap(tps_ratio, groups), at,
                                   at_target_size=(args.batch, args.long) == (16, 32768))}


def print_table(r: dict) -> None:
    print(f"\nsambay GPU targets -- {sb.describe(r['machine'])}")
    print(f"{'id':4}{'metric':36}{'value [95% interval]':>26}  {'target':9}verdict")
    for key, t in GPU_TARGETS.items():
        v = r["verdicts"].get(key)
        if v is None:
            print(f"{t.id:4}{t.what:36}{'n/a':>26}  {t.op + ' ' + format(t.bound, 'g'):9}NOT MEASURED")
            continue
        value = f"{v['value']:.3f} [{v['interval'][0]:.3f}, {v['interval'][1]:.3f}]"
        print(f"{t.id:4}{t.what:36}{value:>26}  {t.op + ' ' + format(t.bound, 'g'):9}{v['verdict']}  "
              f"{v['measured_at']}{'; ' + v['reason'] if v['reason'] else ''}")
    if "compile" in r:
        c = r["compile"]
        print(f"    torch.compile (no graphs): x{c['speedup']:.2f} over eager, {c['compile_s']:.0f} s to compile")
    if r.get("g1_floor_s"):
        print(f"G1 floor: {1e3 * r['g1_floor_s']:.3f} ms/token at {r['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s")
    if r.get("g3", {}).get("note"):
        print("G3 note: " + r["g3"]["note"])
    if r["errors"]:
        print("ERRORS: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()))


if __name__ == "__main__":
    sys.exit(main())
