"""Decode measurements: step time vs context (C1), the sliding ring after many wraps (C5), tokens/s vs
batch size (C6 and the throughput plot), and decode latency vs generation length (the latency plot)."""

from __future__ import annotations

import gc
import math
import time

import torch

from sambay.bench.timing import interleaved, linear_fit, median, synchronize


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _capacity(context: int, plan, warmup: int) -> int:
    return context + warmup + plan.repeats * plan.steps + 1


def decode_vs_context(drivers, plan, device, progress, warmup: int = 2) -> dict:
    """C1: median decode-step time at each context N (batch 1), and a linear fit t = a + b*N per model."""
    raw = {"contexts": list(plan.c1_contexts), "step_s": {d.name: [] for d in drivers}}
    for N in plan.c1_contexts:
        states = {d.name: d.random_state(1, N, _capacity(N, plan, warmup)) for d in drivers}
        fns = {d.name: (lambda d=d, s=states[d.name]: d.step(s)) for d in drivers}
        times = interleaved(
            fns, plan.repeats, inner=plan.steps, warmup=warmup, device=device, log=progress, label=f"C1 N={N}"
        )
        for d in drivers:
            raw["step_s"][d.name].append(median(times[d.name]))
        steps = ", ".join(f"{n} {1e3 * raw['step_s'][n][-1]:.2f} ms" for n in raw["step_s"])
        progress(f"C1 decode step at N={N}: {steps}")
        del states, fns
        free_memory()
    fits = {n: linear_fit(raw["contexts"], ts) for n, ts in raw["step_s"].items()}
    raw["fit"] = {n: {"a_s": a, "b_s_per_token": b} for n, (a, b) in fits.items()}
    names = [d.name for d in drivers]
    b_s, b_b = fits[names[0]][1], fits[names[1]][1]
    # A baseline slope <= 0 means the contexts were too short (or the machine too noisy) to see growth:
    # the ratio is still written, and the verdict says NO DATA.
    raw["baseline_slope_positive"] = b_b > 0
    ratio = b_s / b_b if b_b != 0 else float("nan")
    return {"targets": {"c1_slope_ratio": ratio}, "raw": raw}


def ring_after_wraps(driver, plan, device, progress, warmup: int = 2) -> dict:
    """C5: the sliding-window layers' time per decode step once the window has wrapped many times, over
    the same before the window is full (ring half filled). Measured with forward hooks on the sliding
    blocks so the context-length growth of the full/cross layers does not enter the ratio; the whole
    step's ratio is reported too."""
    model = driver.model
    W = model.config.sliding_window
    blocks = [b for b in model.model.layers if b.role == "sliding_attention"]
    acc = {"t": 0.0, "t0": 0.0}

    def pre(_m, _a):
        synchronize(device)
        acc["t0"] = time.perf_counter()

    def post(_m, _a, _o):
        synchronize(device)
        acc["t"] += time.perf_counter() - acc["t0"]

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    used = warmup + plan.repeats * plan.steps  # steps taken at each point
    before = min(W // 2, W - 2 - used)  # every measured step must happen before the window is full
    if before < 1:
        raise ValueError(f"C5 needs a window larger than the {used} measured steps, got sliding_window={W}")
    points = {"before_full": before, "after_wraps": plan.c5_wraps * W + before}  # same phase of the ring
    try:
        states = {
            k: driver.random_state(1, p, max(W + 1, _capacity(p, plan, warmup))) for k, p in points.items()
        }
        for s in states.values():
            for _ in range(warmup):
                driver.step(s)
        sliding = {k: [] for k in points}
        whole = {k: [] for k in points}
        for r in range(plan.repeats):
            for k in list(points) if r % 2 == 0 else list(points)[::-1]:
                acc["t"] = 0.0
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(plan.steps):
                    driver.step(states[k])
                synchronize(device)
                whole[k].append((time.perf_counter() - t0) / plan.steps)
                sliding[k].append(acc["t"] / plan.steps)
    finally:
        for h in hooks:
            h.remove()
    for k in points:
        progress.spreads.append(
            {
                "point": f"C5 {k}",
                "subject": "sambay sliding layers",
                "min_s": min(sliding[k]),
                "median_s": median(sliding[k]),
                "max_s": max(sliding[k]),
                "spread": max(sliding[k]) / min(sliding[k]),
            }
        )
    med = {k: median(v) for k, v in sliding.items()}
    med_whole = {k: median(v) for k, v in whole.items()}
    progress(
        f"C5 ring: sliding layers {1e3 * med['before_full']:.2f} ms/step at N={points['before_full']} "
        f"(window not full) vs {1e3 * med['after_wraps']:.2f} ms/step at N={points['after_wraps']} "
        f"({plan.c5_wraps} wraps)"
    )
    free_memory()
    return {
        "targets": {"c5_ring_ratio": med["after_wraps"] / med["before_full"]},
        "raw": {
            "positions": points,
            "window": W,
            "sliding_layers": len(blocks),
            "sliding_step_s": med,
            "whole_step_s": med_whole,
            "whole_step_ratio": med_whole["after_wraps"] / med_whole["before_full"],
        },
    }


def throughput_vs_batch(drivers, plan, device, progress, warmup: int = 2) -> dict:
    """C6 and the throughput plot: decode tokens/s at context ``plan.c6_context`` for each batch size."""
    C = plan.c6_context
    raw = {
        "context": C,
        "batches": [],
        "step_s": {d.name: [] for d in drivers},
        "tokens_per_s": {d.name: [] for d in drivers},
        "errors": {},
    }
    for B in plan.c6_batches:
        try:
            states = {d.name: d.random_state(B, C, _capacity(C, plan, warmup)) for d in drivers}
            fns = {d.name: (lambda d=d, s=states[d.name]: d.step(s)) for d in drivers}
            times = interleaved(
                fns,
                plan.repeats,
                inner=plan.steps,
                warmup=warmup,
                device=device,
                log=progress,
                label=f"C6 batch {B}",
            )
        except torch.cuda.OutOfMemoryError as e:  # record and go on with the next size
            raw["errors"][f"batch_{B}"] = f"out of memory: {e}"
            progress(f"C6 batch {B}: out of memory, skipped")
            states = fns = None
            free_memory()
            continue
        raw["batches"].append(B)
        for d in drivers:
            t = median(times[d.name])
            raw["step_s"][d.name].append(t)
            raw["tokens_per_s"][d.name].append(B / t)
        progress(
            f"C6 decode at N={C}, batch {B}: "
            + ", ".join(f"{n} {raw['tokens_per_s'][n][-1]:.1f} tok/s" for n in raw["tokens_per_s"])
        )
        del states, fns
        free_memory()
    names = [d.name for d in drivers]
    targets = {}
    for B in (1, 8):
        if B in raw["batches"]:
            i = raw["batches"].index(B)
            targets[f"c6_tps_ratio_b{B}"] = (
                raw["tokens_per_s"][names[0]][i] / raw["tokens_per_s"][names[1]][i]
            )
        else:
            targets[f"c6_tps_ratio_b{B}"] = float("nan")
    return {"targets": targets, "raw": raw}


def latency_vs_generation(drivers, plan, device, progress, fits: dict | None = None, warmup: int = 2) -> dict:
    """The latency plot: cumulative decode time (batch 1) after a ``latency_prompt``-token prompt state,
    measured in interleaved chunks up to the longest of ``latency_lengths``. With the C1 fits, the same
    curve is also extrapolated to ``long_generation`` tokens: sum over steps of a + b*(P + i)."""
    P, lengths = plan.latency_prompt, sorted(plan.latency_lengths)
    chunk = math.gcd(*lengths)
    G = lengths[-1]
    states = {d.name: d.random_state(1, P, P + G + warmup + 1) for d in drivers}
    for d in drivers:
        for _ in range(warmup):
            d.step(states[d.name])
    total = {d.name: 0.0 for d in drivers}
    curve = {d.name: [] for d in drivers}
    for i, g in enumerate(range(chunk, G + 1, chunk)):
        for d in drivers if i % 2 == 0 else drivers[::-1]:
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(chunk):
                d.step(states[d.name])
            synchronize(device)
            total[d.name] += time.perf_counter() - t0
        if g in lengths:
            for d in drivers:
                curve[d.name].append(total[d.name])
            progress(
                f"latency after {g} generated tokens (prompt {P}): "
                + ", ".join(f"{n} {total[n]:.2f} s" for n in total)
            )
    del states
    free_memory()
    raw = {
        "prompt": P,
        "lengths": lengths,
        "latency_s": curve,
        "note": "decode only (prefill excluded), batch 1",
    }
    if fits:
        Gl = plan.long_generation
        xs = sorted(set([1] + [2**k for k in range(4, 40) if 2**k <= Gl] + [Gl]))
        raw["extrapolated"] = {
            "lengths": xs,
            "latency_s": {
                n: [g * f["a_s"] + f["b_s_per_token"] * (g * P + g * (g - 1) / 2) for g in xs]
                for n, f in fits.items()
            },
        }
        ext = raw["extrapolated"]["latency_s"]
        names = list(ext)
        raw["extrapolated"]["ratio_at_long"] = ext[names[0]][-1] / ext[names[1]][-1]
    return {"targets": {}, "raw": raw}
