"""The paper's serving benchmark (Figure 4) in vLLM: SambaY through sambay's plugin against a same-shape
``Phi3ForCausalLM``, both with random weights, over a sweep of concurrent requests, for a long-generation workload
(short prompt, long generation: the paper's 2K/32K) and a long-prompt workload (the paper's 32K/500), every length
drawn with 30% variance. Generated tokens/s and per-request latency, the SambaY/Phi3 ratio side by side, a PNG.

Run it in the vLLM environment (``.ci/vllm_env.sh`` prints its python), from the repository root:

    $PY -m benchmarks.bench_vllm                       # CPU, configs/sambay-scaled-cpu.json, scaled lengths
    $PY -m benchmarks.bench_vllm --runs 3              # three runs (models alternate order between runs)
    $PY -m benchmarks.bench_vllm --config configs/phi4-mini-flash-reasoning.json --dtype bfloat16 \\
        --long-generation 2000,32000 --long-prompt 32000,500          # the paper's setting, on a GPU

How: vLLM's ``load_format="dummy"`` (random weights, no checkpoint file: the released size needs none) on a
directory holding only config.json; prompts of random token ids; greedy decoding with ``ignore_eos`` so every
request generates its drawn length. Each (model, workload, concurrency c) cell keeps c requests in flight (a new
one starts when one finishes: c concurrent clients) until ``--requests-per-client`` x c have finished; throughput
is all generated tokens over the cell's wall time, latency is each request's time from submission to its last
token. SambaY runs with ``kv_sharing_fast_prefill`` (the YOCO prefill skip). Both run eager (no torch.compile, no
CUDA graphs: the plugin is not compiled; ``--compile`` lets vLLM compile what it can). On CPU the engine runs in
this process with one OpenMP thread unless the environment says otherwise (on a shared 2-core machine a second
spinning thread made steps up to 100x slower).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("sambay", "phi3")
LABELS = {"sambay": "SambaY (sambay plugin)", "phi3": "same-shape transformer (Phi3ForCausalLM)"}


def _pair(text: str) -> tuple[int, int]:
    prompt, gen = (int(x) for x in text.split(","))
    if prompt < 1 or gen < 1:
        raise argparse.ArgumentTypeError(f"expected PROMPT,GENERATION with both >= 1, got {text!r}")
    return prompt, gen


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "sambay-scaled-cpu.json"), help="a phi4flash config.json")
    p.add_argument("--dtype", default="float32", help="vLLM's --dtype for both models (bfloat16 on a GPU)")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated concurrent requests")
    p.add_argument("--long-generation", type=_pair, default=(64, 1024), metavar="PROMPT,GEN",
                   help="mean lengths of the long-generation workload (the paper: 2000,32000)")
    p.add_argument("--long-prompt", type=_pair, default=(1024, 16), metavar="PROMPT,GEN",
                   help="mean lengths of the long-prompt workload (the paper: 32000,500)")
    p.add_argument("--variance", type=float, default=0.3, help="lengths drawn uniformly in mean x [1-v, 1+v]")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="let vLLM compile / capture graphs (default: eager)")
    p.add_argument("--out", default=str(ROOT / "bench-results" / "vllm"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true", help="only print the table and plot of --out's results.json")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not 0 <= args.variance < 1:
        p.error(f"--variance: expected a value in [0, 1), got {args.variance}")
    return args


def write_configs(config_path: str, out: Path) -> dict[str, Path]:
    """out/models/{sambay,phi3}/config.json: the phi4flash config, and the same-shape Phi3 config."""
    from sambay import SambaYConfig
    from sambay.bench.subjects import phi3_config

    spec = json.loads(Path(config_path).read_text())
    SambaYConfig.from_dict(spec)  # validate
    dirs = {m: out / "models" / m for m in MODELS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    (dirs["sambay"] / "config.json").write_text(json.dumps({**spec, "architectures": ["Phi4FlashForCausalLM"]},
                                                           indent=2))
    pc = phi3_config(spec)
    pc.architectures = ["Phi3ForCausalLM"]
    pc.torch_dtype = spec.get("torch_dtype") or "float32"
    pc.to_json_file(str(dirs["phi3"] / "config.json"))
    return dirs


def draw(mean: int, variance: float, rng: random.Random) -> int:
    return max(1, round(mean * rng.uniform(1 - variance, 1 + variance)))


def workload(name: str, lengths: tuple[int, int], n: int, variance: float, vocab: int, seed: int):
    """n requests: (prompt ids, generation length), the same for both models."""
    rng = random.Random(f"{seed}-{name}")
    return [([rng.randrange(10, vocab) for _ in range(draw(lengths[0], variance, rng))],
             draw(lengths[1], variance, rng)) for _ in range(n)]


def engine(model_dir: Path, name: str, args, max_model_len: int, max_seqs: int):
    from vllm import LLM

    return LLM(model=str(model_dir), load_format="dummy", dtype=args.dtype, skip_tokenizer_init=True,
               max_model_len=max_model_len, max_num_seqs=max_seqs, enforce_eager=not args.compile, seed=args.seed,
               kv_sharing_fast_prefill=name == "sambay", enable_prefix_caching=False)


def measure(llm, requests, concurrency: int, tag: str) -> dict:
    """Closed loop: ``concurrency`` requests in flight until all have finished."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = llm.llm_engine
    queue = list(range(len(requests)))
    started: dict[str, float] = {}
    latencies, generated = [], 0
    t0 = time.perf_counter()
    while queue or started:
        while queue and len(started) < concurrency:
            i = queue.pop(0)
            prompt, gen = requests[i]
            rid = f"{tag}-{i}"
            eng.add_request(rid, TokensPrompt(prompt_token_ids=prompt),
                            SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True))
            started[rid] = time.perf_counter()
        for out in eng.step():
            if out.finished:
                latencies.append(time.perf_counter() - started.pop(out.request_id))
                generated += len(out.outputs[0].token_ids)
    wall = time.perf_counter() - t0
    return {"tokens_per_s": generated / wall, "wall_s": wall, "generated": generated,
            "latency_s_median": statistics.median(latencies), "latency_s_mean": statistics.fmean(latencies)}


def close(llm) -> None:
    import contextlib

    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def save(results: dict, out: Path) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")


def run(args) -> dict:
    out = Path(args.out)
    dirs = write_configs(args.config, out)
    spec = json.loads(Path(args.config).read_text())
    top = max(args.concurrency)
    workloads = {}
    for name, lengths in (("long-generation", args.long_generation), ("long-prompt", args.long_prompt)):
        workloads[name] = {c: workload(f"{name}-{c}", lengths, args.requests_per_client * c, args.variance,
                                       spec["vocab_size"], args.seed) for c in args.concurrency}
    longest = max(len(p) + g for w in workloads.values() for reqs in w.values() for p, g in reqs)
    results = {"config": args.config, "dtype": args.dtype, "concurrency": args.concurrency,
               "workloads": {"long-generation": args.long_generation, "long-prompt": args.long_prompt},
               "variance": args.variance, "requests_per_client": args.requests_per_client, "runs": [],
               "machine": machine(), "compile": args.compile}
    for r in range(args.runs):
        order = MODELS if r % 2 == 0 else MODELS[::-1]  # alternate which model runs first
        cells = {}
        for name in order:
            t = time.perf_counter()
            llm = engine(dirs[name], name, args, longest + 8, top)
            print(f"[run {r + 1}] {name}: engine ready in {time.perf_counter() - t:.0f} s", flush=True)
            measure(llm, workloads["long-generation"][args.concurrency[0]][:1], 1, f"warm-{name}-{r}")
            for wname, by_c in workloads.items():
                for c in args.concurrency:
                    m = measure(llm, by_c[c], c, f"{name}-{wname}-{c}-{r}")
                    cells[f"{name}|{wname}|{c}"] = m
                    print(f"[run {r + 1}] {name:6s} {wname:15s} c={c:<3d} {m['tokens_per_s']:9.1f} tok/s  "
                          f"latency {m['latency_s_median']:7.2f} s", flush=True)
            close(llm)
        results["runs"].append(cells)
        save(results, out)  # after every run: an interrupted benchmark keeps its finished runs
    return results


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0] \
            if Path("/proc/cpuinfo").exists() else ""
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags.split()]
        info["cores"] = os.cpu_count()
    return info


def table(results: dict) -> str:
    """Per workload and concurrency: each model's tokens/s and median latency (median over runs, min..max), and
    the SambaY/Phi3 throughput ratio (median over runs of the per-run ratio, min..max)."""
    lines = []
    runs = results["runs"]
    for wname, (p, g) in results["workloads"].items():
        lines.append(f"\n{wname}: prompt ~{p}, generation ~{g} (+-{results['variance']:.0%}), {len(runs)} run(s)")
        lines.append(f"{'c':>3} | {'SambaY tok/s':>14} | {'Phi3 tok/s':>14} | {'ratio':>17} | "
                     f"{'SambaY lat s':>12} | {'Phi3 lat s':>12}")
        for c in results["concurrency"]:
            tps = {n: [run[f"{n}|{wname}|{c}"]["tokens_per_s"] for run in runs] for n in MODELS}
            lat = {n: [run[f"{n}|{wname}|{c}"]["latency_s_median"] for run in runs] for n in MODELS}
            ratio = [a / b for a, b in zip(tps["sambay"], tps["phi3"])]
            lines.append(f"{c:>3} | {_cell(tps['sambay']):>14} | {_cell(tps['phi3']):>14} | "
                         f"{_cell(ratio, '.2f'):>17} | {statistics.median(lat['sambay']):>12.2f} | "
                         f"{statistics.median(lat['phi3']):>12.2f}")
    return "\n".join(lines)


def _cell(values: list[float], fmt: str = ".1f") -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def plot(results: dict, path: Path) -> Path | None:
    """Throughput against concurrency per workload (the paper's Figure 4 layout), each run a point, medians
    joined; the ratio on a second axis."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cs = results["concurrency"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (wname, (p, g)) in zip(axes, results["workloads"].items()):
        for n, color in zip(MODELS, ("tab:blue", "tab:orange")):
            per = [[run[f"{n}|{wname}|{c}"]["tokens_per_s"] for run in results["runs"]] for c in cs]
            for c, vals in zip(cs, per):
                ax.plot([c] * len(vals), vals, ".", color=color, alpha=0.5)
            ax.plot(cs, [statistics.median(v) for v in per], "-o", color=color, label=LABELS[n])
        ax2 = ax.twinx()
        ratio = [statistics.median([run[f"sambay|{wname}|{c}"]["tokens_per_s"] / run[f"phi3|{wname}|{c}"]
                                    ["tokens_per_s"] for run in results["runs"]]) for c in cs]
        ax2.plot(cs, ratio, "--", color="tab:green", label="SambaY / Phi3")
        ax2.set_ylabel("throughput ratio", color="tab:green")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set(xlabel="concurrent requests", ylabel="generated tokens/s",
               title=f"{wname}: prompt ~{p}, generation ~{g}")
        lines = ax.get_legend_handles_labels()
        extra = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8, loc="upper left")
    m = results["machine"]
    where = m.get("gpu") or f"{m.get('cpu')} {m.get('cores')} cores, {m.get('threads')} thread(s)"
    fig.suptitle(f"vLLM {m.get('vllm', '?')}, {Path(results['config']).name}, {results['dtype']}, random weights; "
                 f"{where}; {len(results['runs'])} run(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(out: Path) -> None:
    """Print the table and write the plot of a results.json (e.g. of an interrupted run)."""
    results = json.loads((out / "results.json").read_text())
    text = table(results)
    print(text)
    (out / "table.txt").write_text(text + "\n")
    png = plot(results, out / "throughput_vs_concurrency.png")
    print(f"\nresults: {out / 'results.json'}" + (f", plot: {png}" if png else " (no matplotlib: no plot)"))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():  # CPU: small KV cache, engine in-process, one unbound OpenMP thread
        for key, value in {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}.items():
            os.environ.setdefault(key, value)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.report:
        report(Path(args.out))
        return 0
    run(args)
    report(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
