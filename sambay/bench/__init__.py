"""`sambay bench`: sambay against a same-shape transformer (``transformers.Phi3ForCausalLM``, random
weights), in one process, same dtype and threads, interleaved, medians over repeats.

Sections (``--only``): c1 decode step vs context, c2 decode-state bytes, c3 the YOCO prefill skip, c4
prefill vs prompt length, c5 the sliding ring after many wraps, c6 decode tokens/s vs batch, c7 peak RSS
of loading a bf16 checkpoint, latency (decode latency vs generation length). Targets: PERFORMANCE.md.

    sambay bench --quick             # about a minute on a 2-core CPU
    sambay bench                     # the full CPU run (< 10 min); --device cuda: the released config, bf16
"""

from sambay.bench.suite import SECTIONS, add_arguments, run

__all__ = ["SECTIONS", "add_arguments", "run"]
