"""Interleaved timing, the uncertainty of a statistic of medians (bootstrap over repeats), the machine.

Every comparison is timed interleaved: repeat r runs each subject once, in alternating order, so slow phases
of a shared machine hit both sides. Samples from the same repeat are pairs and are resampled together.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, inner: int = 1, warmup: int = 1,
                device: torch.device | str = "cpu", clock: Callable[[], float] = time.perf_counter
                ) -> dict[str, list[float]]:
    """Time each ``fns[name]()`` ``repeats`` times, interleaved, ``inner`` calls per sample, after ``warmup``
    untimed calls of each. Returns {name: [seconds per call, one per repeat]}. ``clock``: wall time by default;
    ``time.thread_time`` counts only the calling thread's CPU time (one-thread runs on a shared machine: the time
    other processes hold the core is left out)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            t0 = clock()
            for _ in range(inner):
                fns[n]()
            synchronize(device)
            out[n].append((clock() - t0) / inner)
    return out


def bootstrap(statistic: Callable[[list[dict[str, float]]], float], groups: list[dict[str, list[float]]],
              level: float = 0.95, resamples: int = 2000, seed: int = 0, joint: bool = False) -> tuple[float, float]:
    """Percentile interval of ``statistic(medians)``, where ``medians[i][name]`` is the median of a resample
    (with replacement) of ``groups[i][name]``. Within a group every subject is resampled with the same
    indices (the samples of one interleaved repeat are a pair), so all lists of a group have one length;
    ``joint``: every group too (one sweep over all groups per repeat)."""
    rng = np.random.default_rng(seed)
    drawn, idx = [], None  # per group: {name: (resamples,) medians}
    for g in groups:
        lengths = {len(v) for v in g.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"bootstrap: a group's sample lists must be non-empty and of one length, got {lengths}")
        n = lengths.pop()
        if idx is None or not joint:
            idx = rng.integers(0, n, size=(resamples, n))
        elif idx.shape[1] != n:
            raise ValueError(f"bootstrap(joint=True): every group needs the same number of repeats, got {n} and "
                             f"{idx.shape[1]}")
        drawn.append({k: np.median(np.asarray(v, dtype=float)[idx], axis=1) for k, v in g.items()})
    values = np.array([statistic([{n: float(m[n][i]) for n in m} for m in drawn]) for i in range(resamples)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def ratio(num: list[float], den: list[float]) -> dict:
    """median(num) / median(den) of paired samples, with its 95% bootstrap interval."""
    lo, hi = bootstrap(lambda m: m[0]["a"] / m[0]["b"], [{"a": num, "b": den}])
    return {"value": median(num) / median(den), "interval": [lo, hi]}


def machine(device: torch.device | str, threads: int) -> dict:
    """Where the numbers came from (printed with every table)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    import sambay

    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads, "device": str(device),
            "torch": torch.__version__, "transformers": tf, "sambay": sambay.__version__,
            "python": platform.python_version(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = round(os.getloadavg()[0], 2)
    return info


def describe(info: dict) -> str:
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    load = f"; load average {info['loadavg_start']}" if "loadavg_start" in info else ""
    return (f"{info['cpu']} ({info['cpu_count']} CPUs, {info['threads']} threads){gpu}; sambay {info['sambay']}, "
            f"torch {info['torch']}, transformers {info['transformers']}{load}")
