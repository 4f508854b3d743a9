"""Verdicts against PERFORMANCE.md's CPU targets, the table printed on stdout, and results.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Target:
    id: str  # PERFORMANCE.md's id (C1..C7)
    key: str  # results.json key
    op: str  # "<=", ">=", ">" or "==" (the value must satisfy `value op bound`)
    bound: float
    what: str


TARGETS = [
    Target("C1", "c1_slope_ratio", "<=", 0.40, "decode-step slope vs context, sambay/baseline"),
    Target("C2", "c2_ratio_4k", ">=", 14.0, "baseline KV / decode state at 4K (released config)"),
    Target("C2", "c2_ratio_32k", ">=", 27.0, "baseline KV / decode state at 32K (released config)"),
    Target("C2", "c2_ratio_64k", ">=", 0.0, "baseline KV / decode state at 64K (info)"),
    Target("C3", "c3_skip_ratio", "<=", 0.70, "prefill with YOCO skip / without"),
    Target("C4", "c4_growth_ratio", "<=", 1.5, "per-token prefill time, longest / shortest prompt"),
    Target("C4", "c4_vs_baseline_8k", "<=", 0.5, "prefill time at the longest prompt, sambay/baseline"),
    Target("C5", "c5_ring_ratio", "<=", 1.15, "sliding layers' step time after many wraps / before full"),
    Target("C6", "c6_tps_ratio_b1", ">", 1.0, "decode tokens/s sambay/baseline, batch 1"),
    Target("C6", "c6_tps_ratio_b8", ">", 1.0, "decode tokens/s sambay/baseline, batch 8"),
    Target("C7", "c7_peak_rss_ratio", "<=", 1.2, "peak RSS growth / checkpoint bytes (bf16 load)"),
]
# Numbers that are part of a target but are not compared with a bound themselves.
EXTRA_KEYS = [
    "c2_state_bytes_4k",
    "c2_state_bytes_32k",
    "c2_state_bytes_64k",
    "c2_baseline_bytes_4k",
    "c2_baseline_bytes_32k",
    "c2_baseline_bytes_64k",
    "c3_logits_max_abs_diff",
]
ALL_KEYS = [t.key for t in TARGETS] + EXTRA_KEYS


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def verdict(t: Target, value, checks: dict) -> str:
    if t.key == "c2_ratio_64k":
        return "INFO"
    if not finite(value) or checks.get("C1_measurable") is False and t.id == "C1":
        return "NO DATA"
    ok = {"<=": value <= t.bound, ">=": value >= t.bound, ">": value > t.bound, "==": value == t.bound}[t.op]
    # Targets with a correctness side: C2 also needs formula == allocated, C3 identical last-token logits.
    if checks.get(t.id) is False:
        ok = False
    return "PASS" if ok else "MISSED"


def _fmt(x) -> str:
    if not finite(x):
        return "n/a"
    if abs(x) >= 1e6:
        return f"{x:.4g}"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def _sanitize(obj):
    """JSON without NaN/inf (they become null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def correctness_checks(raw: dict) -> dict:
    checks = {}
    if "c1" in raw:
        checks["C1_measurable"] = bool(raw["c1"]["baseline_slope_positive"])
    if "c2" in raw:
        checks["C2"] = bool(raw["c2"]["formula_matches_allocated"])
    if "c3" in raw:
        checks["C3"] = bool(raw["c3"]["logits_match"])
    return checks


def build_results(targets: dict, raw: dict, info: dict, settings: dict, errors: dict, wall_s: float) -> dict:
    checks = correctness_checks(raw)
    verdicts = {t.key: verdict(t, targets.get(t.key), checks) for t in TARGETS if t.key in targets}
    return {
        **{k: targets[k] for k in ALL_KEYS if k in targets},
        "verdicts": verdicts,
        "checks": checks,
        "targets_spec": {t.key: f"{t.op} {t.bound}" for t in TARGETS},
        "machine": info,
        "settings": settings,
        "raw": raw,
        "errors": errors,
        "wall_s": wall_s,
    }


def write_results(path: Path, results: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_sanitize(results), f, indent=2, allow_nan=False)
        f.write("\n")


def _details(key: str, raw: dict, names: tuple[str, str]) -> str:
    s, b = names
    try:
        if key == "c1_slope_ratio":
            f = raw["c1"]["fit"]
            return (
                f"b: {s} {1e6 * f[s]['b_s_per_token']:.3f} us/token, {b} {1e6 * f[b]['b_s_per_token']:.3f} "
                f"us/token (N={','.join(map(str, raw['c1']['contexts']))})"
            )
        if key.startswith("c2_ratio"):
            c = raw["c2"]["contexts"][key.rsplit("_", 1)[1]]
            return (
                f"{c['formula_bytes'] / 2**20:.1f} MiB vs "
                f"{c['tokens'] * raw['c2']['baseline_bytes_per_token'] / 2**30:.3f} GiB; "
                f"formula == allocated: {c['formula_matches_allocated']}"
            )
        if key == "c3_skip_ratio":
            c = raw["c3"]
            return (
                f"{c['time_s']['skip']:.3f} s vs {c['time_s']['no_skip']:.3f} s at {c['tokens']} tokens; logits "
                f"max|diff| {c['max_abs_diff_vs_full_forward']:.1e} ({'ok' if c['logits_match'] else 'MISMATCH'})"
            )
        if key == "c4_growth_ratio":
            c = raw["c4"]
            per = c["per_token_s"][s]
            return f"{1e3 * per[0]:.3f} -> {1e3 * per[-1]:.3f} ms/token ({c['tokens'][0]} -> {c['tokens'][-1]} tokens)"
        if key == "c4_vs_baseline_8k":
            c = raw["c4"]
            return f"{c['time_s'][s][-1]:.2f} s vs {c['time_s'][b][-1]:.2f} s at {c['tokens'][-1]} tokens"
        if key == "c5_ring_ratio":
            c = raw["c5"]
            p = c["positions"]
            return (
                f"{1e3 * c['sliding_step_s']['after_wraps']:.2f} vs {1e3 * c['sliding_step_s']['before_full']:.2f} "
                f"ms (N={p['after_wraps']} vs {p['before_full']}); whole step x{c['whole_step_ratio']:.2f}"
            )
        if key.startswith("c6_tps_ratio_b"):
            c = raw["c6"]
            i = c["batches"].index(int(key.rsplit("b", 1)[1]))
            return f"{c['tokens_per_s'][s][i]:.1f} vs {c['tokens_per_s'][b][i]:.1f} tok/s at N={c['context']}"
        if key == "c7_peak_rss_ratio":
            c = raw["c7"]
            return (
                f"{c['rss_growth'] / 2**20:.0f} MiB for a {c['checkpoint_bytes'] / 2**20:.0f} MiB checkpoint"
            )
    except (KeyError, ValueError, IndexError, TypeError, ZeroDivisionError):
        return ""
    return ""


def table(results: dict, names: tuple[str, str], header: str) -> str:
    rows = [("id", "metric", "value", "target", "verdict", "measured")]
    for t in TARGETS:
        if t.key not in results["verdicts"]:
            continue
        v = results.get(t.key)
        spec = "info" if t.key == "c2_ratio_64k" else f"{t.op} {t.bound:g}"
        rows.append(
            (t.id, t.key, _fmt(v), spec, results["verdicts"][t.key], _details(t.key, results["raw"], names))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [header, ""]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
        if j == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 8)
    missed = [
        f"{t.id} {t.key} = {_fmt(results.get(t.key))} (target {t.op} {t.bound:g})"
        for t in TARGETS
        if results["verdicts"].get(t.key) == "MISSED"
    ]
    if missed:
        lines += ["", "MISSED: " + "; ".join(missed)]
    return "\n".join(lines)
