"""Prefill measurements: the YOCO prefill skip (C3) and prefill time vs prompt length (C4)."""

from __future__ import annotations

import gc

import torch

from sambay.bench.timing import interleaved, median


def yoco_skip(sambay, plan, device, progress) -> dict:
    """C3: prefill of ``c3_tokens`` tokens with the cross-decoder on the last position only
    (logits_to_keep=1) against the same prefill with the cross-decoder on every position (the model body
    with logits_to_keep=0, then the LM head on the last position): the cross-decoder skip alone. The full
    forward that also computes every position's logits is timed too, for reference.
    Correctness: the skip's last-token logits against a full forward without a cache."""
    model, T = sambay.model, plan.c3_tokens
    g = torch.Generator(device=sambay.device).manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, T), device=sambay.device, generator=g)

    def skip():
        return model(ids, cache=model.allocate_cache(1, T), logits_to_keep=1).logits

    def no_skip():
        h = model.model(ids, cache=model.allocate_cache(1, T), logits_to_keep=0)
        return model.lm_head(h[:, -1:])

    def all_logits():
        return model(ids, cache=model.allocate_cache(1, T), logits_to_keep=0).logits

    fns = {"skip": skip, "no_skip": no_skip, **({"all_logits": all_logits} if plan.c3_all_logits else {})}
    times = interleaved(fns, plan.c3_repeats, warmup=1, device=device, log=progress, label=f"C3 {T} tokens")
    med = {k: median(v) for k, v in times.items()}
    last_skip = skip()[0, -1].float()
    last_full = model(ids).logits[0, -1].float()  # the plain full forward (no cache, every position)
    last_noskip = no_skip()[0, -1].float()
    diff = (last_skip - last_full).abs().max().item()
    scale = max(1.0, last_full.abs().max().item())
    tol = (1e-4 if model.dtype == torch.float32 else 3e-2) * scale
    raw = {
        "tokens": T,
        "time_s": med,
        "samples_s": times,
        "max_abs_diff_vs_full_forward": diff,
        "max_abs_diff_vs_no_skip": (last_skip - last_noskip).abs().max().item(),
        "bitwise_equal": bool(torch.equal(last_skip, last_full)),
        "tolerance": tol,
        "logits_match": diff <= tol,
    }
    if "all_logits" in med:
        raw["ratio_vs_all_logits"] = med["skip"] / med["all_logits"]
    progress(
        f"C3 prefill {T} tokens: skip {med['skip']:.3f} s, no skip {med['no_skip']:.3f} s"
        + (f", all logits {med['all_logits']:.3f} s" if "all_logits" in med else "")
        + f"; last-token logits max |diff| {diff:.2e} (tol {tol:.1e})"
    )
    return {
        "targets": {"c3_skip_ratio": med["skip"] / med["no_skip"], "c3_logits_max_abs_diff": diff},
        "raw": raw,
    }


def prefill_vs_length(drivers, plan, device, progress) -> dict:
    """C4 and the prefill plot: prefill time (batch 1, last-token logits) at each prompt length."""
    g = torch.Generator(device=drivers[0].device).manual_seed(4)
    vocab = min(d.vocab for d in drivers)
    lengths = list(plan.c4_tokens)
    raw = {"tokens": lengths, "time_s": {d.name: [] for d in drivers}}
    warm = torch.randint(0, vocab, (1, min(lengths)), device=drivers[0].device, generator=g)
    for d in drivers:  # one untimed prefill each (allocator, lazy init)
        d.prefill(warm)
    for T in lengths:
        ids = torch.randint(0, vocab, (1, T), device=drivers[0].device, generator=g)
        fns = {d.name: (lambda d=d, ids=ids: d.prefill(ids)) for d in drivers}
        times = interleaved(
            fns, plan.c4_repeats, warmup=0, device=device, log=progress, label=f"C4 {T} tokens"
        )
        for d in drivers:
            raw["time_s"][d.name].append(median(times[d.name]))
        progress(
            f"C4 prefill {T} tokens: " + ", ".join(f"{n} {raw['time_s'][n][-1]:.3f} s" for n in raw["time_s"])
        )
        gc.collect()
    names = [d.name for d in drivers]
    s, b = raw["time_s"][names[0]], raw["time_s"][names[1]]
    growth = (s[-1] / lengths[-1]) / (s[0] / lengths[0])
    raw["per_token_s"] = {n: [t / T for t, T in zip(ts, lengths)] for n, ts in raw["time_s"].items()}
    return {"targets": {"c4_growth_ratio": growth, "c4_vs_baseline_8k": s[-1] / b[-1]}, "raw": raw}
