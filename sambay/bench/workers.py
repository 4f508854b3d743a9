"""How benchmark processes run: the one worker runner and OpenMP policy of every benchmark.

A measurement that needs the whole machine (a real-size model, several GB) runs in its own process, one per model:
memory comes back when it exits and a crash or a kill for memory loses only its own result. The process gets its
thread count and OpenMP's wait policy before torch loads (OpenMP reads ``OMP_WAIT_POLICY`` once, at load):

- ``"ACTIVE"`` (threads spin between parallel regions): the fastest on a quiet machine, so the default for workers
  that own it (``benchmarks.bench_real``; docs/PERFORMANCE.md has the measurements);
- ``"PASSIVE"`` (threads sleep): for measurements that share cores with other processes (``sambay bench``,
  ``benchmarks.run``), where spinning threads stall at every barrier;
- ``"env"``: leave the environment's setting (unset is OpenMP's spin-then-sleep).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

WAIT_POLICIES = ("ACTIVE", "PASSIVE", "env")
ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding this sambay


def worker_env(threads: int | None, wait_policy: str | None) -> dict:
    """The environment of a worker: this sambay first on its path, ``OMP_NUM_THREADS`` = threads (if given) and
    ``OMP_WAIT_POLICY`` = wait_policy (None or "env": the environment's)."""
    if wait_policy not in (None, *WAIT_POLICIES):
        raise ValueError(f"wait_policy: expected one of {WAIT_POLICIES} or None, got {wait_policy!r}")
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if wait_policy not in (None, "env"):
        env["OMP_WAIT_POLICY"] = wait_policy
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def peak_rss() -> int:
    """VmHWM in bytes (ru_maxrss would carry the parent's peak over fork+exec on Linux)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def write_json(path: Path, obj) -> None:
    """JSON without NaN/inf (they become null)."""

    def clean(o):
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    path.write_text(json.dumps(clean(obj), indent=1, allow_nan=False) + "\n", encoding="utf-8")


def write_result(path: Path, obj) -> None:
    """Atomically (a worker's result is read after it exits, maybe killed midway), without NaN/inf."""
    tmp = path.with_name(path.name + ".tmp")
    write_json(tmp, obj)
    os.replace(tmp, path)


def run_worker(module: str, spec: dict, label: str, tmp: Path, log: Callable[[str], None],
               timeout: float | None = None) -> dict:
    """``python -m <module> --worker spec.json`` in a fresh process with ``spec["threads"]`` threads and
    ``spec["omp_wait_policy"]``, killed after ``timeout`` seconds. Returns its result dict (the worker writes it
    to ``spec["result"]``; partial if it died, status "stopped" if it was stopped) with its exit code and wall time.
    """
    n = len(list(tmp.glob("spec-*.json")))
    spec_path, result_path = tmp / f"spec-{n}.json", tmp / f"result-{n}.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    env = worker_env(spec.get("threads"), spec.get("omp_wait_policy"))
    log(f"{label} ...")
    t0 = time.perf_counter()
    stopped = False
    try:
        rc = subprocess.run([sys.executable, "-m", module, "--worker", str(spec_path)], env=env, timeout=timeout,
                            check=False).returncode
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        rc, stopped = None, True
    wall = time.perf_counter() - t0
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {"status": "error"}
    if stopped:
        result.update(status="stopped", reason=f"stopped after {timeout:.0f} s, at the time budget (--budget-s)")
    elif rc != 0:
        if result.get("status") in ("ok", "running"):
            result["status"] = "error"
        result.setdefault("reason", f"the worker exited with status {rc} (killed for memory if -9; see the log)")
    result.update(exit_code=rc, wall_s=wall)
    status = result["status"] + (f": {result['reason']}" if result.get("reason") else "")
    log(f"{label}: {status} (worker {wall:.1f} s)")
    return result
