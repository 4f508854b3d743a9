"""Timing primitives: interleaved medians, device sync, progress lines, linear fits, the machine.

Every comparison is timed interleaved: repeat r runs each subject once, in alternating order, so slow
phases of a shared machine hit both sides; the reported number is the median over repeats.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


class Progress:
    """Progress lines on stderr, stamped with the time since the run started."""

    def __init__(self, stream=None):
        self.start = time.perf_counter()
        self.stream = stream if stream is not None else sys.stderr
        self.spreads: list[dict] = []  # one entry per timed point: how far apart its repeats were

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", file=self.stream, flush=True)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    inner: int = 1,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    log: Progress | None = None,
    label: str = "",
) -> dict[str, list[float]]:
    """Time each ``fns[name]()`` ``repeats`` times, interleaved, ``inner`` calls per sample.

    Returns {name: [seconds per call, one per repeat]}. ``warmup`` untimed calls of each first. With
    ``log``, the spread of each subject's samples (max/min) is recorded in ``log.spreads``.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    synchronize(device)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            synchronize(device)
            out[n].append((time.perf_counter() - t0) / inner)
    if log is not None:
        for n, ts in out.items():
            log.spreads.append(
                {
                    "point": label,
                    "subject": n,
                    "min_s": min(ts),
                    "median_s": statistics.median(ts),
                    "max_s": max(ts),
                    "spread": max(ts) / min(ts) if min(ts) > 0 else float("inf"),
                }
            )
    return out


def noisy(spreads: list[dict], limit: float = 1.5) -> list[dict]:
    """The timed points whose repeats differ by more than ``limit`` (max/min): a busy machine."""
    return [s for s in spreads if len(s) and s["spread"] > limit]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares t = a + b * x. Returns (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else float("nan")
    return my - b * mx, b


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sambay_version() -> str:
    """The package version, plus the git commit (and '+dirty') when sambay runs from a checkout."""
    import subprocess
    from pathlib import Path

    import sambay

    root = Path(sambay.__file__).resolve().parents[1]
    version = sambay.__version__
    if (root / ".git").exists():
        try:
            rev = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            if rev:
                version += f" (git {rev}{'+dirty' if dirty else ''})"
        except (OSError, subprocess.SubprocessError):
            pass
    return version


def machine(device: torch.device | str, threads: int) -> dict:
    """A description of where the numbers came from (printed with every table)."""
    d = torch.device(device)
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": str(d),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    info["sambay"] = _sambay_version()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if d.type == "cuda":
        p = torch.cuda.get_device_properties(d)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def describe(info: dict) -> str:
    omp = f", OMP_WAIT_POLICY={info['omp_wait_policy']}" if info.get("omp_wait_policy") else ""
    parts = [f"{info['cpu']} ({info['cpu_count']} CPUs, {info['threads']} threads{omp})"]
    if "gpu" in info:
        parts.append(f"{info['gpu']} ({info['gpu_memory_gib']} GiB)")
    parts.append(
        f"sambay {info.get('sambay')}, torch {info['torch']}, transformers {info.get('transformers')}, "
        f"Python {info['python']}"
    )
    if "loadavg_start" in info:
        la = f"load average at start {info['loadavg_start'][0]}"
        if "loadavg_end" in info:
            la += f", at end {info['loadavg_end'][0]}"
        parts.append(la)
    return "; ".join(parts)
