"""PNG plots of the measurements (matplotlib, the ``bench`` extra): the announcement's two plots
(decode latency vs generation length, throughput vs concurrency) plus decode-step time vs context (C1)
and prefill time vs prompt length (C4). Without matplotlib the plots are skipped with a message."""

from __future__ import annotations

from pathlib import Path

COLORS = {"sambay": "tab:blue", "phi3": "tab:orange"}
LABELS = {"sambay": "SambaY (sambay)", "phi3": "same-shape transformer (Phi3)"}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(title: str, subtitle: str):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_title(f"{title}\n{subtitle}", fontsize=10)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path) -> Path:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(raw: dict, out: Path, subtitle: str) -> list[Path]:
    written = []
    if "latency" in raw:
        r = raw["latency"]
        plt, fig, ax = _figure(
            f"Decode latency vs generation length (batch 1, {r['prompt']}-token prompt state)", subtitle
        )
        for n, ys in r["latency_s"].items():
            ax.plot(r["lengths"], ys, "o", color=COLORS.get(n), label=f"{LABELS.get(n, n)} measured")
        if "extrapolated" in r:
            e = r["extrapolated"]
            for n, ys in e["latency_s"].items():
                ax.plot(
                    e["lengths"], ys, "--", color=COLORS.get(n), label=f"{LABELS.get(n, n)} from the C1 fit"
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("decode latency (s)")
        written.append(_save(plt, fig, ax, out / "latency_vs_generation.png"))
    if "c6" in raw and raw["c6"]["batches"]:
        r = raw["c6"]
        plt, fig, ax = _figure(f"Decode throughput vs concurrency (context {r['context']} tokens)", subtitle)
        for n, ys in r["tokens_per_s"].items():
            ax.plot(r["batches"], ys, "o-", color=COLORS.get(n), label=LABELS.get(n, n))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (concurrent sequences)")
        ax.set_ylabel("decode tokens/s")
        written.append(_save(plt, fig, ax, out / "throughput_vs_batch.png"))
    if "c1" in raw:
        r = raw["c1"]
        plt, fig, ax = _figure("Decode-step time vs context (batch 1), with linear fits (C1)", subtitle)
        xs = r["contexts"]
        for n, ys in r["step_s"].items():
            f = r["fit"][n]
            ax.plot(xs, [1e3 * y for y in ys], "o", color=COLORS.get(n), label=LABELS.get(n, n))
            ax.plot(
                xs,
                [1e3 * (f["a_s"] + f["b_s_per_token"] * x) for x in xs],
                "-",
                color=COLORS.get(n),
                alpha=0.6,
                label=f"fit: {1e6 * f['b_s_per_token']:.3f} us/token",
            )
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode step (ms)")
        written.append(_save(plt, fig, ax, out / "decode_step_vs_context.png"))
    if "c4" in raw:
        r = raw["c4"]
        plt, fig, ax = _figure("Prefill time vs prompt length (batch 1, last-token logits) (C4)", subtitle)
        for n, ys in r["time_s"].items():
            ax.plot(r["tokens"], ys, "o-", color=COLORS.get(n), label=LABELS.get(n, n))
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill time (s)")
        written.append(_save(plt, fig, ax, out / "prefill_vs_prompt.png"))
    return written
