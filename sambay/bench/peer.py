"""sambay against llama.cpp side by side (issue 22; targets P1-P3 of docs/PERFORMANCE.md): the released config with
random weights and random decode states, against a Phi-4-mini-shaped GGUF with random weights in llama.cpp
(``sambay.bench.llamacpp``), batch 1, the same threads, the decode steps of the two interleaved.

    python -m sambay.bench.peer          # bf16/BF16, int8/Q8_0, int4/Q4_K_M, int8-a8/Q8_0, int4-a8/Q4_K_M: 512, 4K, 16K
    python -m sambay.bench.peer --pairs int4 --contexts 512 --repeats 3    # one pair, one context

Needs ``gguf`` and ``llama-cpp-python`` built for this CPU (``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install
llama-cpp-python gguf``; minutes on 2 cores), about 18 GB of RAM for the bf16 pair at 16K, and disk for the GGUFs
(7.7 + 4.1 + 2.3 GB) and the state files (0.13 GB per 1K positions) in ``--cache-dir``; all are written once and
reused. sambay's random-weight bf16 checkpoint is built once too (``--sambay-cache-dir``, shared with
bench_real.py). Per format pair: llama.cpp loads its GGUF in a worker process (its threads never share a process
with torch's), sambay loads the checkpoint in this one (``from_pretrained(dtype=bfloat16, quantize=None | "int8" |
"int4")``); at each context both get a decode state (sambay: random;
llama.cpp: a random sequence-state file), then ``sambay.bench.measure.decode_step_seconds`` times their steps
interleaved. The read bandwidth (C++ streaming read and ``torch.sum``) is measured at the start and at the end.

The two processes take turns on the same cores, so neither may spin while the other runs: this process must not run
with ``OMP_WAIT_POLICY=ACTIVE`` (its idle OpenMP threads would spin through llama.cpp's turns); both run with
OpenMP's default policy (spin briefly, then sleep) unless ``--omp-wait-policy`` sets one for the llama.cpp worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

from sambay.bench.llamacpp import LlamaCppProcess, Phi3Shape, quantize_gguf, write_phi3_gguf

# sambay variant -> llama.cpp format; "-a8": the same weights with 8-bit activations (sambay.quant.set_activations)
PAIRS = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M", "int8-a8": "Q8_0", "int4-a8": "Q4_K_M"}
RELEASED = "phi4-mini-flash-reasoning"


def gguf_file(cache: Path, shape: Phi3Shape, fmt: str, threads: int, log=print) -> Path:
    """The GGUF of ``fmt`` in ``cache``: the BF16 one written with random weights, the others quantized from it by
    llama.cpp; each once."""
    bf16 = cache / f"{shape.tag()}-BF16.gguf"
    if not bf16.is_file():
        t0 = time.perf_counter()
        write_phi3_gguf(bf16, shape)
        log(f"  wrote {bf16} ({bf16.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    if fmt == "BF16":
        return bf16
    out = cache / f"{shape.tag()}-{fmt}.gguf"
    if not out.is_file():
        t0 = time.perf_counter()
        quantize_gguf(bf16, out, fmt, threads)
        log(f"  quantized {out} ({out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    return out


def sambay_checkpoint(config: dict, directory: Path, seed: int = 0, log=print) -> Path:
    """A bf16 checkpoint of ``config`` with random weights in ``directory``, built once (minutes at the released
    size: the init pass) and reused while its config.json (written last by ``save_pretrained``) is there and
    describes the same model. bench_real.py keeps its checkpoint in the same place."""
    from sambay import SambaYConfig, SambaYForCausalLM

    want = SambaYConfig.from_dict(config)
    if (directory / "config.json").is_file():
        have = SambaYConfig.from_pretrained(directory)
        plain = have.torch_dtype == "bfloat16" and getattr(have, "quantization_config", None) is None
        if plain and dataclasses.replace(have, torch_dtype=None) == dataclasses.replace(want, torch_dtype=None):
            return directory
        log(f"  {directory}: another config, rebuilding it")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    SambaYForCausalLM(want, dtype=torch.bfloat16).save_pretrained(directory)
    log(f"  built the random-weight checkpoint {directory} in {time.perf_counter() - t0:.0f} s")
    return directory


def sambay_subject(checkpoint: Path, variant: str):
    """The checkpoint loaded as a user would: bf16, or quantized while loading (``quantize="int8"|"int4"``) the
    first time, then saved quantized next to it (``<name>-int4``; minutes saved per run on 2 cores) and loaded from
    there while it is newer than the bf16 checkpoint."""
    from sambay import SambaYForCausalLM
    from sambay.bench.subjects import SambaY

    if variant == "bf16":
        return SambaY.from_model(SambaYForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16))
    weights, a8 = variant.removesuffix("-a8"), variant.endswith("-a8")
    saved = checkpoint.with_name(checkpoint.name.removesuffix("-bf16") + f"-{weights}")
    if (saved / "config.json").is_file() and \
            (saved / "config.json").stat().st_mtime_ns > (checkpoint / "config.json").stat().st_mtime_ns:
        model = SambaYForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    else:
        model = SambaYForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, quantize=weights)
        model.save_pretrained(saved)
    if a8:
        model.set_activations("int8")
    return SambaY.from_model(model)


def run_pair(variant: str, fmt: str, config: dict, shape: Phi3Shape, args, log=print) -> dict:
    """Both subjects of one format pair, decode steps interleaved at every context: {context: samples}."""
    from sambay.bench.measure import decode_step_seconds
    from sambay.bench.timing import median, ratio

    cache = Path(args.cache_dir).expanduser()
    path = gguf_file(cache, shape, fmt, args.threads, log)
    env = {"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {}
    peer = LlamaCppProcess(path, shape, args.threads, cache / "states", env=env)
    out = {"variant": variant, "format": fmt, "gguf": str(path), "gguf_bytes": path.stat().st_size, "contexts": {}}
    try:
        t0 = time.perf_counter()
        subject = sambay_subject(args.checkpoint, variant)
        out["sambay_load_s"] = time.perf_counter() - t0
        for n in args.contexts:
            d = decode_step_seconds([subject, peer], 1, n, repeats=args.repeats, steps=args.steps, warmup=args.warmup)
            s, p = d["samples_s"][subject.name], d["samples_s"][peer.name]
            r = ratio(p, s)  # sambay's speed relative to llama.cpp's: llama.cpp's time / sambay's
            out["contexts"][n] = {"sambay_s": s, "llama_cpp_s": p, "speed": r["value"], "interval": r["interval"],
                                  "loadavg": round(os.getloadavg()[0], 2)}
            log(f"  {variant} vs {fmt}, context {n}: sambay {1e3 * median(s):.1f} ms, llama.cpp {1e3 * median(p):.1f} "
                f"ms, speed {r['value']:.2f}x [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]")
        del subject
    finally:
        peer.close()
        gc.collect()
    return out


def report(results: dict) -> str:
    s, bw = results["settings"], results["bandwidth"]
    from sambay.bench.bandwidth import describe
    from sambay.bench.timing import describe as machine

    lines = [f"sambay.bench.peer: sambay {s['config']} (random weights and decode states) vs llama.cpp "
             f"{results['llama_cpp']} on a random {s['shape']} GGUF; batch 1, {s['threads']} threads",
             machine(results["environment"]),
             "read bandwidth: " + "; ".join(f"{b['when']}: {describe(b)}" for b in bw)]
    ctx = s["contexts"]
    header = ["pair"] + [f"context {n}" for n in ctx]
    rows = [header]
    for pr in results["pairs"]:
        cells = [f"{pr['variant']} vs {pr['format']}"]
        for n in ctx:
            c = pr.get("contexts", {}).get(n) or pr.get("contexts", {}).get(str(n))
            if c is None:
                cells.append(pr.get("error", "-")[:40])
                continue
            ms = lambda xs: 1e3 * sorted(xs)[len(xs) // 2]  # noqa: E731
            cells.append(f"{ms(c['sambay_s']):.0f} vs {ms(c['llama_cpp_s']):.0f} ms: {c['speed']:.2f}x "
                         f"[{c['interval'][0]:.2f}-{c['interval'][1]:.2f}]")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append("cells: sambay vs llama.cpp median ms per token; speed = llama.cpp time / sambay time [95% interval]")
    return "\n".join(lines)


def main(argv=None) -> int:
    from sambay.bench.bandwidth import read_bandwidths
    from sambay.bench.subjects import load_config
    from sambay.bench.timing import machine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=RELEASED, help="sambay's config (a shipped name or a config.json path)")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"sambay variants from {list(PAIRS)}, each against "
                   "its llama.cpp format")
    p.add_argument("--contexts", default="512,4096,16384")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="decode steps per timed sample")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", default="phi4-mini", help="the GGUF's shape: phi4-mini, or a JSON of Phi3Shape fields")
    p.add_argument("--omp-wait-policy", default=None, help="OMP_WAIT_POLICY for the llama.cpp worker (default: "
                   "the environment's)")
    p.add_argument("--bandwidth-mib", type=int, default=2048)
    p.add_argument("--cache-dir", default="~/.cache/sambay/bench-peer", help="GGUFs and state files, kept")
    p.add_argument("--sambay-cache-dir", default="~/.cache/sambay/bench-real", help="where sambay's random-weight "
                   "checkpoint is kept (<dir>/<config name>-bf16; bench_real.py's place)")
    p.add_argument("--out", default="bench-peer.json")
    args = p.parse_args(argv)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE":
        print("sambay.bench.peer: OMP_WAIT_POLICY=ACTIVE here would keep this process's idle OpenMP threads spinning "
              "through llama.cpp's turns; run with it unset (or PASSIVE)", file=sys.stderr)
        return 2
    pairs = [x.strip() for x in args.pairs.split(",") if x.strip()]
    bad = [x for x in pairs if x not in PAIRS]
    if bad:
        print(f"sambay.bench.peer: --pairs: expected names from {list(PAIRS)}, got {bad}", file=sys.stderr)
        return 2
    args.contexts = sorted({int(x) for x in args.contexts.split(",")})
    shape = Phi3Shape() if args.shape == "phi4-mini" else Phi3Shape(**json.loads(args.shape))
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    import llama_cpp

    results = {"settings": {"config": args.config, "shape": shape.tag(), "pairs": pairs, "contexts": args.contexts,
                            "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
                            "threads": args.threads, "llama_omp_wait_policy": args.omp_wait_policy},
               "environment": machine("cpu", args.threads), "llama_cpp": f"llama-cpp-python {llama_cpp.__version__}",
               "bandwidth": [], "pairs": []}
    name = Path(args.config).parent.name if Path(args.config).name == "config.json" else Path(args.config).stem
    args.checkpoint = sambay_checkpoint(config, Path(args.sambay_cache_dir).expanduser() / f"{name}-bf16",
                                        log=lambda m: print(m, file=sys.stderr, flush=True))
    results["bandwidth"].append({"when": "start", **read_bandwidths(args.bandwidth_mib, args.threads)})
    for v in pairs:
        print(f"[{time.strftime('%H:%M:%S')}] {v} vs {PAIRS[v]} ...", file=sys.stderr, flush=True)
        try:
            results["pairs"].append(run_pair(v, PAIRS[v], config, shape, args,
                                             log=lambda m: print(m, file=sys.stderr, flush=True)))
        except (RuntimeError, MemoryError, OSError) as e:
            results["pairs"].append({"variant": v, "format": PAIRS[v], "error": f"{type(e).__name__}: {e}"})
            print(f"  {v}: {results['pairs'][-1]['error']}", file=sys.stderr)
    results["bandwidth"].append({"when": "end", **read_bandwidths(args.bandwidth_mib, args.threads)})
    results["environment"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    print(report(results))
    from sambay.bench.command import write_json

    write_json(Path(args.out), results)
    print(f"results: {args.out}")
    return 0 if all("error" not in pr for pr in results["pairs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
