"""One command for the next machine with a GPU (A100, H100, H200): does every CUDA path run and agree?

    pip install -e ".[test,cuda]"            # wheels; see the README's GPU section
    python -m benchmarks.gpu_check           # < 5 minutes on an H100/H200; writes gpu_check.json

Steps (each recorded, a failure in one does not stop the others):
  1. environment: torch/CUDA/GPU, package versions, ``sambay.kernels.active_backends("cuda")`` (which backend
     "auto" runs for each op family), and any warning a probe gave (an installed package that fails to import).
  2. ``pytest -m cuda``: the CUDA-marked tests (kernels vs twins at realistic sizes, bf16 judged against fp32).
  3. the tiny8 fixture model on CUDA ("auto": the fast paths) against the CPU twins, prefill at T = 5 and 128
     (128: the scan's vectorized loads) and 4 decode steps: fp32 within 1e-4 relative (TF32 off), bf16 judged
     against the fp32 CPU reference (no worse than 2x the bf16 twins' error on CUDA, + 1e-2).
  4. the static decode step captured in a CUDA graph and replayed, against the eager step, 8 steps: fp32 logits
     within 1e-5 relative.
  5. ``benchmarks.bench_gpu`` (G1, G2, G3, G6), its JSON included (``--skip-bench`` to leave it out).
  6. the compile table (G7): every Triton kernel the model launches compiled for sm_80 and sm_90 by
     ``sambay.kernels.compile_check`` (bf16 at the released shapes, no GPU needed; registers, spills, shared
     memory), printed and recorded (``--skip-compile`` to leave it out).
Exit status 0 when every check passed. The JSON (``--out``, default ./gpu_check.json) holds everything.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def environment() -> dict:
    import sambay.kernels as kernels

    versions = {}
    for pkg in ("torch", "triton", "mamba-ssm", "causal-conv1d", "flash-attn", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        active = kernels.active_backends("cuda")
    return {"python": platform.python_version(), "versions": versions, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "active_backends": active, "probe_warnings": [str(w.message) for w in caught]}


def cuda_tests() -> dict:
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "summary": tail, "seconds": time.time() - t,
            "failures": [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))],
            "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}


def _run(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill ids[:, :-steps] with a cache, then decode the remaining tokens one by one; all logits (fp32)."""
    T = ids.shape[1] - steps
    cache = model.allocate_cache(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        logits = [model(ids[:, :T], cache=cache).logits.float()]
        for t in range(T, ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], cache=cache).logits.float())
    return torch.cat(logits, 1).cpu()


def model_vs_twins() -> dict:
    from tests.helpers import fixture_model  # tests/ as a namespace package of the checkout

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out, ok = {}, True
    for T in (5, 128):
        ids = torch.randint(0, 256, (2, T + 4), generator=torch.Generator().manual_seed(T))
        cpu = fixture_model("tiny8").eval()
        cpu.set_backend("torch")
        ref = _run(cpu, ids, 4)
        gpu = fixture_model("tiny8").eval().cuda()
        gpu.set_backend("auto")
        fp32 = rel_err(_run(gpu, ids.cuda(), 4), ref)
        g16 = fixture_model("tiny8", dtype=torch.bfloat16).eval().cuda()
        g16.set_backend("auto")
        fast16 = rel_err(_run(g16, ids.cuda(), 4), ref)
        g16.set_backend("torch")
        twin16 = rel_err(_run(g16, ids.cuda(), 4), ref)
        case = {"fp32_rel_err": fp32, "bf16_fast_rel_err": fast16, "bf16_twin_rel_err": twin16,
                "fp32_ok": fp32 <= 1e-4, "bf16_ok": fast16 <= 2 * twin16 + 1e-2}
        ok &= case["fp32_ok"] and case["bf16_ok"]
        out[f"T={T}"] = case
    out["ok"] = ok
    return out


def graph_replay(steps: int = 8) -> dict:
    """The static decode step captured once and replayed, against the eager (dynamic) decode step."""
    from sambay.generation import decode_one_token
    from tests.helpers import fixture_model  # tests/ as a namespace package of the checkout

    torch.backends.cuda.matmul.allow_tf32 = False
    model = fixture_model("tiny8").eval().cuda()
    ids = torch.randint(0, 256, (1, 16 + steps), generator=torch.Generator().manual_seed(0)).cuda()
    eager_cache, graph_cache = (model.allocate_cache(1, ids.shape[1]) for _ in range(2))
    with torch.no_grad():
        model(ids[:, :16], cache=eager_cache)
        model(ids[:, :16], cache=graph_cache)
        token = ids[:, 16].clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # capture needs a warm-up on a side stream; run it on a scratch cache
            scratch = model.allocate_cache(1, ids.shape[1])
            model(ids[:, :16], cache=scratch)
            for _ in range(2):
                decode_one_token(model, token, scratch, static=True)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = decode_one_token(model, token, graph_cache, static=True)
        # Capture ran the Python side (which marks cache.length stale) but no kernel; each replay advances
        # cache.pos, from which cache.length is re-read when next asked for.
        errs = []
        for t in range(16, 16 + steps):
            token.copy_(ids[:, t])
            graph.replay()
            eager = decode_one_token(model, ids[:, t], eager_cache)
            errs.append(rel_err(logits.clone(), eager))
    return {"steps": steps, "max_rel_err": max(errs), "ok": max(errs) <= 1e-5}


def compiled_decode(steps: int = 8) -> dict:
    """sambay.compiled.decode_step (torch.compile, fullgraph, mode reduce-overhead) vs the eager decode step:
    outputs, the compile time, one compilation for every position, and the per-step time ratio."""
    from torch._dynamo.utils import counters

    from sambay.compiled import decode_step
    from tests.helpers import fixture_model  # tests/ as a namespace package of the checkout

    torch.backends.cuda.matmul.allow_tf32 = False
    model = fixture_model("tiny8").eval().cuda()
    model.set_backend("auto")  # probes run here, before compiling
    ids = torch.randint(0, 256, (1, 16 + steps), generator=torch.Generator().manual_seed(0)).cuda()
    eager_cache, compiled_cache = (model.allocate_cache(1, ids.shape[1]) for _ in range(2))
    step = decode_step(model, report=False)
    errs, t_eager, t_comp = [], [], []
    with torch.no_grad():
        for c in (eager_cache, compiled_cache):
            model(ids[:, :16], cache=c)
        t = time.time()
        for i in range(16, 16 + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            e = model(ids[:, i:i + 1], cache=eager_cache).logits[:, -1]
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            c = step(ids[:, i], compiled_cache)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            errs.append(rel_err(c.clone(), e))
            if i > 17:  # the first two compiled calls compile and record the graph
                t_eager.append(t1 - t0)
                t_comp.append(t2 - t1)
    ratio = sorted(t_eager)[len(t_eager) // 2] / sorted(t_comp)[len(t_comp) // 2]
    graphs = counters["stats"]["unique_graphs"]
    return {"steps": steps, "max_rel_err": max(errs), "total_s": time.time() - t, "unique_graphs": graphs,
            "eager_over_compiled": ratio, "ok": max(errs) <= 1e-4 and graphs == 1}


def bench(out_dir: Path) -> dict:
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--out", str(out_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    result = {"ok": proc.returncode == 0, "returncode": proc.returncode, "seconds": time.time() - t,
              "stdout_tail": proc.stdout[-3000:]}
    path = out_dir / "gpu_results.json"
    if path.exists():
        result["results"] = json.loads(path.read_text())
    return result


def compile_table() -> dict:
    """G7: the compile-only check of every Triton kernel for sm_80 and sm_90 (bf16, the released shapes)."""
    from sambay.kernels.compile_check import run_check

    records, table = run_check(["--part=train", "--part=decode"], dtypes=("bfloat16",), timeout=240)
    print(table)
    problems = [f"sm_{r.arch} {r.kernel}: {p}" for r in records for p in r.problems()]
    return {"kernels": len(records), "problems": problems, "table": table, "ok": not problems}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--skip-bench", action="store_true", help="leave out bench_gpu.py")
    p.add_argument("--skip-compile", action="store_true", help="leave out the sm_80/sm_90 compile table")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
        return 2
    report: dict = {}
    steps = [("environment", environment), ("cuda_tests", cuda_tests), ("model_vs_twins", model_vs_twins),
             ("graph_replay", graph_replay), ("compiled_decode", compiled_decode)]
    if not args.skip_bench:
        steps.append(("bench_gpu", lambda: bench(Path(args.out).resolve().parent / "bench-results")))
    if not args.skip_compile:
        steps.append(("compile_table", compile_table))
    for name, fn in steps:
        t = time.time()
        try:
            report[name] = fn()
        except Exception as e:  # record and go on: one broken path must not hide the others
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        ok = report[name].get("ok", True)
        print(f"{name:15s} {'ok' if ok else 'FAILED'} ({time.time() - t:.0f} s)")
        if name == "environment" and ok:
            print(f"  {report[name]['gpu']}, active backends: {report[name]['active_backends']}")
            for w in report[name]["probe_warnings"]:
                print(f"  warning: {w}")
    report["ok"] = all(v.get("ok", True) for v in report.values() if isinstance(v, dict))
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"{'all passed' if report['ok'] else 'FAILURES'}; wrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
