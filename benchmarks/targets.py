"""Every target of docs/PERFORMANCE.md in one table (C: scaled CPU, R: real-size CPU, G: GPU), and verdicts that
noise cannot fake. benchmarks.run judges C, benchmarks.bench_real R, benchmarks.bench_gpu G, all in one vocabulary.

Each target is computed from the raw samples of ``sambay.bench`` measurements into an estimate: a value, a
95% bootstrap interval over the interleaved repeats, the size it was measured at, and any reason it cannot
pass. The verdict:
  PASS / MISSED   the whole interval is on one side of the bound;
  INCONCLUSIVE    the interval straddles the bound, or the estimate is unfit to judge (a negative slope, a
                  line that does not fit its points): the runner repeats more before giving up;
  NOT MEASURED AT TARGET SIZE   the measurement exists but not at the size the target names (``--quick``);
  NOT MEASURED    not in this run.
Pure functions of plain dicts: tests/test_bench.py checks them on synthetic numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sambay.bench import bootstrap, median

PASS, MISSED, INCONCLUSIVE, NOT_AT_SIZE = "PASS", "MISSED", "INCONCLUSIVE", "NOT MEASURED AT TARGET SIZE"
NOT_MEASURED = "NOT MEASURED"
MIN_R2 = 0.9  # a C1 line must explain this share of the variance of its medians to be judged


@dataclass(frozen=True)
class Target:
    id: str
    key: str
    op: str  # "<=", ">=" or ">": the value must satisfy `value op bound`
    bound: float
    what: str
    size: str  # the size the target names, in words




TARGETS = [
    Target("C1", "c1_slope_ratio", "<=", 0.40, "decode-step slope vs context, sambay/phi3",
           "N from <= 512 to >= 16384, 3+ points"),
    Target("C2", "c2_ratio_4k", ">=", 14.0, "same-shape KV / decode state, released config", "N=4096"),
    Target("C2", "c2_ratio_32k", ">=", 27.0, "same-shape KV / decode state, released config", "N=32768"),
    Target("C3", "c3_skip_ratio", "<=", 0.70, "prefill with the YOCO skip / without", "2048 tokens"),
    Target("C4", "c4_growth_ratio", "<=", 1.5, "per-token prefill time 8K / 1K", "1024 -> 8192 tokens"),
    Target("C4", "c4_vs_phi3_8k", "<=", 0.5, "prefill time, sambay/phi3", "8192 tokens"),
    Target("C5", "c5_ring_ratio", "<=", 1.15, "sliding layers' decode step after wraps / before full",
           ">= 8 window wraps"),
    Target("C6", "c6_tps_ratio_b1", ">", 1.0, "decode tokens/s, sambay/phi3", "batch 1, N=4096"),
    Target("C6", "c6_tps_ratio_b8", ">", 1.0, "decode tokens/s, sambay/phi3", "batch 8, N=4096"),
    Target("C7", "c7_peak_rss_ratio", "<=", 1.2, "peak RSS growth / checkpoint bytes, bf16 load",
           "a checkpoint >= 64 MiB (the file, not the interpreter, dominates)"),
    # real size, batch 1, one value per part (benchmarks.bench_real: the medians of its workers' steps)
    Target("R1", "r1_bf16_over_floor", "<=", 1.25, "bf16 decode step / its floor", "512"),
    Target("R2", "r2_bf16_over_int8", ">=", 1.8, "bf16 step / int8 step", "512"),
    Target("R2", "r2_int8_over_floor", "<=", 1.3, "int8 step / its floor", "512"),
    Target("R3", "r3_bf16_over_int4", ">=", 3.0, "bf16 step / int4 step", "512"),
    Target("R3", "r3_int4_over_floor", "<=", 1.5, "int4 step / its floor", "512"),
    Target("R4", "r4_prefill_vs_phi3", ">=", 1.0, "prefill tokens/s, sambay bf16 / Phi3", "2048, Phi-4-mini shape"),
    Target("R5", "r5_rss_growth_over_model", "<=", 1.05, "load RSS growth / the loaded model's bytes, worst variant",
           "the released config"),
    Target("R6", "r6_long_over_short", "<=", 1.15, "bf16 decode step, long / short context", "512 and 32768"),
    Target("R6", "r6_phi3_over_bf16", ">=", 2.5, "Phi3 bf16 decode step / sambay bf16", "32768, Phi-4-mini shape"),
    # GPU (benchmarks.bench_gpu)
    Target("G1", "g1_ratio_to_floor", "<=", 1.4, "decode b1 / bandwidth floor", "N=4096"),
    Target("G2", "g2_ratio", "<=", 1.25, "decode b1 at 32K / at 4K", "N=4096, 32768"),
    Target("G3", "g3_tps_ratio", ">=", 2.5, "tokens/s b16, sambay/phi3", "batch 16, N=32768"),
    Target("G6", "g6_graph_speedup", ">=", 2.0, "CUDA-graph / eager decode b1", "batch 1"),
]
BY_KEY = {t.key: t for t in TARGETS}


def of(letter: str) -> list[Target]:
    """The targets of one family: "C", "R" or "G"."""
    return [t for t in TARGETS if t.id.startswith(letter)]


@dataclass
class Estimate:
    value: float
    interval: tuple[float, float]
    measured_at: str  # the sizes, in words
    at_target_size: bool = True
    problems: list[str] = field(default_factory=list)  # reasons it cannot pass (unfit to judge)
    failures: list[str] = field(default_factory=list)  # correctness conditions of the target that failed
    detail: dict = field(default_factory=dict)


def judge(target: Target, est: Estimate | None) -> tuple[str, str]:
    """(verdict, reason) of one estimate against its target."""
    if est is None:
        return NOT_MEASURED, "not measured in this run"
    if not est.at_target_size:
        return NOT_AT_SIZE, f"the target names {target.size}"
    if est.failures:
        return MISSED, "; ".join(est.failures)
    lo, hi = est.interval
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE, "no finite interval"
    if target.op == "<=":
        side = PASS if hi <= target.bound else MISSED if lo > target.bound else INCONCLUSIVE
    elif target.op == ">=":
        side = PASS if lo >= target.bound else MISSED if hi < target.bound else INCONCLUSIVE
    elif target.op == ">":
        side = PASS if lo > target.bound else MISSED if hi <= target.bound else INCONCLUSIVE
    else:
        raise ValueError(f"target {target.key}: unknown op {target.op!r}")
    if est.problems:  # a slope of the wrong sign or a line that misses its points judges nothing
        return INCONCLUSIVE, "; ".join(est.problems)
    if side == INCONCLUSIVE:
        return INCONCLUSIVE, f"the interval [{lo:.3g}, {hi:.3g}] straddles {target.bound:g}"
    return side, ""


def linear_fit(xs, ys) -> tuple[float, float, float]:
    """Least squares y = a + b x: (a, b, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / syy if syy > 0 else 0.0
    return a, b, r2


def _exact(value: float, measured_at: str, **kw) -> Estimate:
    return Estimate(value, (value, value), measured_at, **kw)


def c1_slope_ratio(points: list[dict], joint: bool = False) -> Estimate:
    """points: ``decode_step_seconds`` results at batch 1, one per context. b_sambay / b_phi3 of the lines
    t = a + b N through the medians; the interval resamples the repeats of every point (``joint``: with the
    same indices at every point, for the points of one sweep, ``decode_step_seconds_vs_context``)."""
    points = sorted(points, key=lambda p: p["context"])
    xs = [p["context"] for p in points]
    groups = [p["samples_s"] for p in points]

    def slope_ratio(medians):
        return linear_fit(xs, [m["sambay"] for m in medians])[1] / linear_fit(xs, [m["phi3"] for m in medians])[1]

    fits = {n: linear_fit(xs, [median(g[n]) for g in groups]) for n in ("sambay", "phi3")}
    problems = [f"{n} slope {1e9 * b:.3g} ns/token is not positive" for n, (_, b, _) in fits.items() if b <= 0]
    problems += [f"{n} line fits poorly (R^2 {r2:.2f} < {MIN_R2})" for n, (_, _, r2) in fits.items() if r2 < MIN_R2]
    return Estimate(fits["sambay"][1] / fits["phi3"][1], bootstrap(slope_ratio, groups, joint=joint),
                    f"N={','.join(map(str, xs))}", at_target_size=len(xs) >= 3 and xs[0] <= 512 and xs[-1] >= 16384,
                    problems=problems,
                    detail={n: {"a_s": a, "b_s_per_token": b, "r2": r2} for n, (a, b, r2) in fits.items()})


def c2_state_ratio(state: dict, context: int) -> Estimate:
    """``decode_state_bytes`` of the released config: same-shape KV bytes / decode-state bytes (exact)."""
    if context not in state["contexts"]:
        return _exact(float("nan"), f"N={','.join(map(str, state['contexts']))}", at_target_size=False)
    i = state["contexts"].index(context)
    ok = state["formula_bytes"][i] == state["allocated_bytes"][i]
    return _exact(state["same_shape_kv_bytes"][i] / state["formula_bytes"][i], f"N={context}",
                  failures=[] if ok else ["the formula differs from the allocated bytes"])


def c3_skip_ratio(m: dict) -> Estimate:
    s = m["samples_s"]
    lo_hi = bootstrap(lambda x: x[0]["skip"] / x[0]["no_skip"], [s])
    ok = m["logits_max_abs_diff"] <= m["tolerance"]
    return Estimate(median(s["skip"]) / median(s["no_skip"]), lo_hi, f"{m['tokens']} tokens",
                    at_target_size=m["tokens"] == 2048,
                    failures=[] if ok else [f"last-token logits differ by {m['logits_max_abs_diff']:.2g}"])


def c4_growth_ratio(short: dict, long: dict) -> Estimate:
    """``prefill_seconds`` at 1K and 8K: sambay's per-token time at 8K over at 1K."""
    a, b = short["tokens"], long["tokens"]
    lo_hi = bootstrap(lambda m: (m[1]["sambay"] / b) / (m[0]["sambay"] / a), [short["samples_s"], long["samples_s"]])
    value = (median(long["samples_s"]["sambay"]) / b) / (median(short["samples_s"]["sambay"]) / a)
    return Estimate(value, lo_hi, f"{a} -> {b} tokens", at_target_size=(a, b) == (1024, 8192))


def c4_vs_phi3(m: dict) -> Estimate:
    s = m["samples_s"]
    return Estimate(median(s["sambay"]) / median(s["phi3"]), bootstrap(lambda x: x[0]["sambay"] / x[0]["phi3"], [s]),
                    f"{m['tokens']} tokens", at_target_size=m["tokens"] == 8192)


def c5_ring_ratio(m: dict) -> Estimate:
    s = m["samples_s"]
    lo_hi = bootstrap(lambda x: x[0]["after_wraps"] / x[0]["before_full"], [s])
    return Estimate(median(s["after_wraps"]) / median(s["before_full"]), lo_hi,
                    f"N={m['positions']['after_wraps']} ({m['wraps']} wraps) vs {m['positions']['before_full']}",
                    at_target_size=m["wraps"] >= 8)


def c6_tps_ratio(m: dict, batch: int) -> Estimate:
    """``decode_step_seconds``: sambay's tokens/s over phi3's = phi3's step time over sambay's."""
    s = m["samples_s"]
    return Estimate(median(s["phi3"]) / median(s["sambay"]), bootstrap(lambda x: x[0]["phi3"] / x[0]["sambay"], [s]),
                    f"batch {m['batch']}, N={m['context']}", at_target_size=(m["batch"], m["context"]) == (batch, 4096))


def c7_rss_ratio(m: dict) -> Estimate:
    size = m["checkpoint_bytes"]
    return _exact(m["rss_growth_bytes"] / size, f"a {size / 2**20:.0f} MiB checkpoint",
                  at_target_size=size >= 64 * 2**20)
