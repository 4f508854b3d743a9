"""Compiled vs eager decode (issue: compiled decode), side by side in one run.

The static decode step compiled once (``sambay.compiled.decode_step``, fullgraph) against the eager dynamic
decode step, on the scaled CPU config (configs/sambay-scaled-cpu.json: the released layer pattern, hidden 256,
32 layers, window 512) in fp32 with random weights, batch 1. Both continue the same prefilled cache state; the
steps are interleaved (eager, compiled, eager, ...) and the medians compared. Prints the compile time, the
per-step medians, the ratio eager/compiled (target >= 1.5 on CPU) and whether the tokens agree.

    python -m benchmarks.bench_compiled [--context 512] [--steps 32] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sambay import SambaYConfig, SambaYForCausalLM
from sambay.compiled import decode_step

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sambay-scaled-cpu.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=512, help="prompt length before decoding (default: 512)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps of each kind (default: 32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default: 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype (default: float32)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here (default: none)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    model = SambaYForCausalLM(SambaYConfig.from_pretrained(CONFIG)).to(device=device, dtype=dtype).eval()
    L = a.context + 2 * a.steps + 8
    prompt = torch.randint(0, model.config.vocab_size, (1, a.context), device=device)
    step = decode_step(model, report=False)
    with torch.no_grad():
        caches = [model.allocate_cache(1, L) for _ in range(2)]
        for c in caches:
            last = model(prompt, cache=c, logits_to_keep=1).logits[:, -1]
        token = last.argmax(-1)
        t0 = time.perf_counter()
        step(token, caches[1])  # compiles
        _sync(device)
        compile_s = time.perf_counter() - t0
        model(token[:, None], cache=caches[0])  # same position for both
        tok_e = tok_c = token
        eager, compiled, agree = [], [], 0
        for _ in range(a.steps):
            t0 = time.perf_counter()
            le = model(tok_e[:, None], cache=caches[0]).logits[:, -1]
            _sync(device)
            eager.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lc = step(tok_c, caches[1])
            _sync(device)
            compiled.append(time.perf_counter() - t0)
            tok_e, tok_c = le.argmax(-1), lc.argmax(-1)
            agree += int(torch.equal(tok_e, tok_c))
    res = {"device": str(device), "dtype": a.dtype, "context": a.context, "steps": a.steps, "compile_s": compile_s,
           "eager_ms": 1e3 * statistics.median(eager), "compiled_ms": 1e3 * statistics.median(compiled),
           "tokens_agree": f"{agree}/{a.steps}"}
    res["ratio_eager_over_compiled"] = res["eager_ms"] / res["compiled_ms"]
    print(f"compile {compile_s:.1f} s | decode step at {a.context} tokens: eager {res['eager_ms']:.2f} ms, "
          f"compiled {res['compiled_ms']:.2f} ms -> {res['ratio_eager_over_compiled']:.2f}x "
          f"(target >= 1.5 on CPU, >= 2 on GPU) | greedy tokens agree {res['tokens_agree']}")
    if a.out is not None:
        a.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
