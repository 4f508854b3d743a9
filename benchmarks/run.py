"""The CPU targets of docs/PERFORMANCE.md (C1-C7): sambay against a same-shape transformers.Phi3ForCausalLM,
measured with ``sambay.bench`` at the sizes the targets name, judged by benchmarks/targets.py (each ratio
with a 95% interval over its repeats; INCONCLUSIVE after extra repeats when the interval straddles the
target), plotted by benchmarks/plots.py. A table on stdout; results.json and PNG plots in --out.

    python -m benchmarks.run --quick      # C4 not at its 8K size (reported as such)
    python -m benchmarks.run              # every target at its size
    python -m benchmarks.run --check      # exit status: 0 all judged PASS, 1 a MISSED or an error, 3 INCONCLUSIVE
    python -m benchmarks.run --only c3,c5 # some sections: c1..c7, latency
"""

from __future__ import annotations

import os

# OpenMP reads this when torch loads: spin-waiting threads that share cores with other processes stall at
# every barrier (docs/PERFORMANCE.md, sambay.bench.workers). Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import sambay.bench as sb  # noqa: E402
from benchmarks import plots  # noqa: E402
from benchmarks import targets as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("c1", "c2", "c3", "c4", "c5", "c6", "c7", "latency")
BASELINE = {"c1", "c4", "c6", "latency"}
_C7 = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8,
       "num_key_value_heads": 4}  # a checkpoint of ~180 MB: the file, not the interpreter, dominates the RSS
PLANS = {
    "quick": {"config": "sambay-scaled-cpu", "repeats": 5, "prefill_repeats": 3, "steps": 1, "rounds": 1,
              "c1": (512, 4096, 16384), "c3": 2048, "c4": (512, 2048), "c5_wraps": 8, "c6": (1, 8),
              "c7": _C7, "latency": (512, (16, 32, 64))},
    "full": {"config": "sambay-scaled-cpu", "repeats": 7, "prefill_repeats": 4, "steps": 2, "rounds": 2,
             "c1": (512, 2048, 8192, 16384, 32768), "c3": 2048, "c4": (1024, 2048, 4096, 8192), "c5_wraps": 16,
             "c6": (1, 2, 4, 8, 16), "c7": {**_C7, "hidden_size": 768, "intermediate_size": 3072,
                                             "num_hidden_layers": 16, "num_attention_heads": 12,
                                             "num_key_value_heads": 6},
             "latency": (2048, (128, 256, 512, 1024))},
    "tiny": {"config": str(ROOT / "configs" / "sambay-tiny.json"), "repeats": 3, "prefill_repeats": 2, "steps": 1,
             "rounds": 1, "c1": (64, 256, 1024), "c3": 128, "c4": (64, 256), "c5_wraps": 8, "c6": (1, 8),
             "c7": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4}, "latency": (32, (4, 8))},
}
C6_CONTEXT = 4096


class Measurements:
    """The raw measurements by key, taken on first use; ``extend`` adds repeats to one (same sizes)."""

    def __init__(self, plan: dict, subjects: list, log):
        self.plan, self.subjects, self.log, self.m = plan, subjects, log, {}
        self.reads: list[tuple] = []  # the keys read since the caller last cleared it

    def _take(self, key: tuple) -> dict:
        p, kind = self.plan, key[0]
        if kind == "sweep":
            return sb.decode_step_seconds_vs_context(self.subjects, list(key[1]), p["repeats"], p["steps"])
        if kind == "decode":
            return sb.decode_step_seconds(self.subjects, key[1], key[2], p["repeats"], p["steps"])
        if kind == "prefill":
            return sb.prefill_seconds(self.subjects, key[1], p["prefill_repeats"])
        if kind == "yoco":
            return sb.yoco_prefill_seconds(self.subjects[0].model, key[1], p["prefill_repeats"])
        if kind == "sliding":
            return sb.sliding_layer_seconds(self.subjects[0].model, key[1], p["repeats"])
        raise KeyError(key)

    def __call__(self, *key) -> dict:
        self.reads.append(key)
        if key not in self.m:
            self.m[key] = self._take(key)
            self.log(f"{' '.join(map(str, key))}: {_medians(self.m[key])}")
        return self.m[key]

    def extend(self, key: tuple) -> None:
        old, more = self.m[key], self._take(key)
        for mine, new in zip(old.get("points", [old]), more.get("points", [more])):
            for field in ("samples_s", "whole_step_samples_s"):
                for name, xs in new.get(field, {}).items():
                    mine[field][name] += xs
        self.log(f"{' '.join(map(str, key))} with more repeats: {_medians(self.m[key])}")


def _medians(m: dict) -> str:
    if "points" in m:
        return "; ".join(f"N={p['context']}: {_medians(p)}" for p in m["points"])
    return ", ".join(f"{n} {1e3 * sb.median(v):.2f} ms" for n, v in m["samples_s"].items())


def repeats(m: dict) -> int:
    return min(len(v) for p in m.get("points", [m]) for v in p.get("samples_s", {}).values())


def estimators(plan: dict, released: dict) -> dict:
    """key -> (sections, a function of Measurements giving the estimate)."""
    c4 = plan["c4"]
    out = {
        "c1_slope_ratio": ("c1", lambda m: T.c1_slope_ratio(m("sweep", plan["c1"])["points"], joint=True)),
        "c2_ratio_4k": ("c2", lambda m: T.c2_state_ratio(released, 4096)),
        "c2_ratio_32k": ("c2", lambda m: T.c2_state_ratio(released, 32768)),
        "c3_skip_ratio": ("c3", lambda m: T.c3_skip_ratio(m("yoco", plan["c3"]))),
        "c4_growth_ratio": ("c4", lambda m: T.c4_growth_ratio(m("prefill", c4[0]), m("prefill", c4[-1]))),
        "c4_vs_phi3_8k": ("c4", lambda m: T.c4_vs_phi3(m("prefill", c4[-1]))),
        "c5_ring_ratio": ("c5", lambda m: T.c5_ring_ratio(m("sliding", plan["c5_wraps"]))),
        "c7_peak_rss_ratio": ("c7", lambda m: T.c7_rss_ratio(m.m.setdefault(("load",), sb.load_peak_rss(
            {**sb.load_config(plan["config"]), **plan["c7"]}, torch.get_num_threads())))),
    }
    for b in (1, 8):
        out[f"c6_tps_ratio_b{b}"] = ("c6", lambda m, b=b: T.c6_tps_ratio(m("decode", b, C6_CONTEXT), b))
    return out


def judge_all(keys: list[str], est_fns: dict, m: Measurements, rounds: int, log, errors: dict) -> dict:
    """Estimate and judge each target; an INCONCLUSIVE one gets its measurements repeated again, up to
    ``rounds`` times, before it is reported as such."""
    verdicts = {}
    for key in keys:
        for r in range(rounds + 1):
            m.reads = []
            try:
                with torch.inference_mode():
                    est = est_fns[key][1](m)
            except Exception as e:  # noqa: BLE001 -- one failed measurement must not lose the others
                errors[key] = f"{type(e).__name__}: {e}"
                log(f"{key} FAILED: {errors[key]}")
                traceback.print_exc(file=sys.stderr)
                break
            verdict, reason = T.judge(T.BY_KEY[key], est)
            used = list(dict.fromkeys(m.reads))
            if verdict != T.INCONCLUSIVE or r == rounds or not used:
                break
            log(f"{key}: {reason}: repeating {len(used)} measurement(s)")
            for k in used:
                m.extend(k)
        if key not in errors:
            n = min((repeats(m.m[k]) for k in used), default=0)
            verdicts[key] = {"value": est.value, "interval": list(est.interval), "measured_at": est.measured_at,
                             "repeats": n, "verdict": verdict, "reason": reason, "detail": est.detail}
    return verdicts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter points; C4 is not measured at 8K")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: the tiny config, seconds
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"sections, of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--check", action="store_true", help="exit status follows the verdicts (see above)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", default="bench-results", help="directory for results.json and the plots")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if not sections or set(sections) - set(SECTIONS) or args.threads < 1:
        ap.error(f"--only: expected some of {','.join(SECTIONS)}; --threads >= 1")
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    config = sb.load_config(plan["config"])
    info = sb.machine("cpu", args.threads)
    log(f"{sb.describe(info)}\nmodel: {sb.shape(config)}, float32")
    subjects = []
    if set(sections) - {"c2", "c7"}:
        subjects.append(sb.SambaY(config, torch.float32, "cpu"))
    if BASELINE & set(sections):
        subjects.append(sb.Phi3(config, torch.float32, "cpu"))
    m = Measurements(plan, subjects, log)
    released = sb.decode_state_bytes(sb.load_config("phi4-mini-flash-reasoning"), [4096, 32768, 65536])
    est_fns = estimators(plan, released)
    keys = [t.key for t in T.of("C") if est_fns[t.key][0] in sections]
    errors: dict = {}
    verdicts = judge_all(keys, est_fns, m, plan["rounds"], log, errors)
    latency = None
    if "latency" in sections:
        latency = sb.decode_latency_seconds(subjects, *plan["latency"])
        log(f"latency after {latency['lengths']} tokens: {latency['latency_s']}")
    results = {"machine": info, "plan": {k: v for k, v in plan.items()}, "model": sb.shape(config),
               "verdicts": verdicts, "errors": errors, "decode_state_released": released, "latency": latency,
               "measurements": [{"key": list(k), **v} for k, v in m.m.items()], "wall_s": time.perf_counter() - start}
    print(table(results, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        written = plots.make_all(results, out)
        print("plots: " + ", ".join(str(p) for p in written) if written else "plots: none (matplotlib missing?)")
    sb.write_json(out / "results.json", results)
    print(f"results: {out / 'results.json'} (wall time {results['wall_s']:.0f} s)")
    return exit_status(verdicts, errors, args.check)


def exit_status(verdicts: dict, errors: dict, check: bool) -> int:
    if errors:
        return 1
    if not check:
        return 0
    judged = [v["verdict"] for v in verdicts.values()]
    return 1 if T.MISSED in judged else 3 if T.INCONCLUSIVE in judged else 0


def table(results: dict, args) -> str:
    rows = [("id", "metric", "value [95% interval]", "target", "verdict", "measured at (repeats) / reason")]
    for t in T.of("C"):
        v = results["verdicts"].get(t.key)
        if v is None:
            continue
        lo, hi = v["interval"]
        value = f"{v['value']:.3f} [{lo:.3f}, {hi:.3f}]" if lo != hi else f"{v['value']:.3f} (exact)"
        at = v["measured_at"] + (f" ({v['repeats']})" if v["repeats"] else "")
        rows.append((t.id, t.key, value, f"{t.op} {t.bound:g}", v["verdict"], at + (f"; {v['reason']}" if
                                                                                      v["reason"] else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"sambay targets ({'tiny' if args.tiny else 'quick' if args.quick else 'full'}): {results['model']}, "
             f"float32, {args.threads} threads; {sb.describe(results['machine'])}"]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
        if j == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 30)
    if results["errors"]:
        lines.append("ERRORS: " + "; ".join(f"{k}: {e}" for k, e in results["errors"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
