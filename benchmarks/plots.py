"""PNG plots of benchmarks/run.py's results (matplotlib): measured points with the min..max of their repeats;
fit lines only across the measured range; an extrapolation drawn dashed in a shaded region labelled as such.

    decode_step_vs_context.png   C1 medians and the lines t = a + b N behind the slope ratio
    throughput_vs_batch.png      decode tokens/s against concurrency (C6), at 4K context
    prefill_vs_prompt.png        prefill time against prompt length (C4)
    latency_vs_generation.png    cumulative decode latency, measured; then extrapolated from the C1 lines
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = {"sambay": "tab:blue", "phi3": "tab:orange"}
LABELS = {"sambay": "SambaY (sambay)", "phi3": "same-shape transformer (Phi3)"}
LONG_GENERATION = 32768  # the announcement's generation length


def make_all(results: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    by_kind: dict[str, list[dict]] = {}
    for m in results["measurements"]:
        by_kind.setdefault(m["key"][0], []).append(m)
    subtitle = f"{results['model']}\nfloat32, {results['machine']['threads']} threads"
    written = []
    decode = [m for m in by_kind.get("decode", []) if "phi3" in m["samples_s"]]
    c1 = [p for m in by_kind.get("sweep", []) for p in m["points"] if "phi3" in p["samples_s"]]
    fits = results["verdicts"].get("c1_slope_ratio", {}).get("detail", {})
    if c1:
        fig, ax = _figure(plt, "Decode-step time vs context (batch 1), lines fitted to the medians (C1)", subtitle)
        xs = [m["context"] for m in c1]
        for n in ("sambay", "phi3"):
            _points(ax, xs, [m["samples_s"][n] for m in c1], n, scale=1e3)
            if n in fits:
                f = fits[n]
                ax.plot(xs, [1e3 * (f["a_s"] + f["b_s_per_token"] * x) for x in xs], "-", color=COLORS[n], alpha=0.5,
                        label=f"{n} line: {1e9 * f['b_s_per_token']:.1f} ns/token, R^2 {f['r2']:.2f}")
        ax.set(xlabel="context (tokens)", ylabel="decode step (ms)")
        written.append(_save(plt, fig, ax, out / "decode_step_vs_context.png"))
    c6 = sorted((m for m in decode if m["context"] == 4096), key=lambda m: m["batch"])
    if len({m["batch"] for m in c6}) > 1:
        fig, ax = _figure(plt, "Decode throughput vs concurrency (context 4096)", subtitle)
        for n in ("sambay", "phi3"):
            _points(ax, [m["batch"] for m in c6], [[m["batch"] / t for t in m["samples_s"][n]] for m in c6], n)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size (concurrent sequences)", ylabel="decode tokens/s")
        written.append(_save(plt, fig, ax, out / "throughput_vs_batch.png"))
    prefill = sorted(by_kind.get("prefill", []), key=lambda m: m["tokens"])
    if prefill:
        fig, ax = _figure(plt, "Prefill time vs prompt length (batch 1, last-token logits) (C4)", subtitle)
        for n in ("sambay", "phi3"):
            _points(ax, [m["tokens"] for m in prefill], [m["samples_s"][n] for m in prefill], n)
        ax.set(xlabel="prompt tokens", ylabel="prefill time (s)")
        written.append(_save(plt, fig, ax, out / "prefill_vs_prompt.png"))
    if results.get("latency"):
        written.append(_latency(plt, results["latency"], fits, subtitle, out / "latency_vs_generation.png"))
    return written


def _latency(plt, lat: dict, fits: dict, subtitle: str, path: Path) -> Path:
    """Measured cumulative latency; beyond the last measured length, the measured total plus the C1 line's
    step times a + b (P + i), dashed, in a shaded region."""
    P, G = lat["prompt"], lat["lengths"][-1]
    fig, ax = _figure(plt, f"Decode latency vs generation length (batch 1, {P}-token prompt state)", subtitle)
    for n, ys in lat["latency_s"].items():
        ax.plot(lat["lengths"], ys, "o-", color=COLORS[n], label=f"{LABELS[n]}, measured")
    if fits:
        ax.axvspan(G, LONG_GENERATION, color="0.92", zorder=0)
        ax.text(G * 1.1, 0.98, "extrapolated from the C1 lines (not measured)", transform=ax.get_xaxis_transform(),
                va="top", fontsize=8, color="0.3")
        g = np.unique(np.geomspace(G, LONG_GENERATION, 24).astype(int))
        for n, ys in lat["latency_s"].items():
            a, b = fits[n]["a_s"], fits[n]["b_s_per_token"]
            steps = g - G  # steps after the last measured one, at contexts P + G .. P + g - 1
            extra = a * steps + b * (steps * (P + G) + steps * (steps - 1) / 2)
            ax.plot(g, ys[-1] + extra, "--", color=COLORS[n], alpha=0.7, label=f"{LABELS[n]}, extrapolated")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set(xlabel="generated tokens", ylabel="decode latency (s)")
    return _save(plt, fig, ax, path)


def _points(ax, xs, samples, name, scale=1.0):
    med = np.array([np.median(s) for s in samples]) * scale
    lo = med - np.array([min(s) for s in samples]) * scale
    hi = np.array([max(s) for s in samples]) * scale - med
    ax.errorbar(xs, med, yerr=[lo, hi], fmt="o", capsize=3, color=COLORS[name],
                label=f"{LABELS[name]}: median, min..max of repeats")


def _figure(plt, title: str, subtitle: str):
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.set_title(f"{title}\n{subtitle}", fontsize=9)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(plt, fig, ax, path: Path) -> Path:
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
