"""sambay's CPU decode kernels at a config's shapes: every linear of one decoded token in bf16, int8 and int4, and
the decode attention over the shared K/V, against the read bandwidth measured in the same run.

    python -m benchmarks.bench_cpu_kernels                          # the released config (~1.5 GB of buffers)
    python -m benchmarks.bench_cpu_kernels --config configs/sambay-tiny.json --context 64   # a smoke run

The linears' shapes come from the model itself, built on the meta device (no weights): each distinct (N, K) is
timed on random weights with one activation row, the call cycling over enough copies of the weight (``--cycle-mib``)
that none is in cache, as in a decode step where each linear's weight was last read a whole token ago. The median
call time (the formats interleaved) times the number of linears of that shape sums to the linears' share of one
token. The decode attention is timed at ``--context`` keys with the shared K/V's shape. The read bandwidth is
``bench_real.sum_bandwidth`` (``torch.sum`` over a ``--bandwidth-mib`` fp32 buffer) at the start and at the end;
the floors use the higher, as in ``benchmarks.bench_real``.
Prints GB/s per shape and each format's total as a ratio to its bytes over the bandwidth: near 1, the kernel
streams at the memory's speed; above it, arithmetic or access patterns bound it. Run it on a quiet machine
(``--threads``, default 2).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys

import torch

from sambay import SambaYConfig, SambaYForCausalLM
from sambay.bench import load_config, sum_bandwidth
from sambay.bench.timing import interleaved, median
from sambay.kernels.dispatch import cpu_probe
from sambay.kernels.linear import ref as quant_ref
from sambay.layers.linear import Linear


def linear_shapes(config: SambaYConfig) -> collections.Counter:
    """(N, K) -> how many linears of one decode step have that weight shape (the LM head included)."""
    model = SambaYForCausalLM(config, device="meta", dtype=torch.bfloat16)
    return collections.Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, Linear))


def time_shape(n: int, k: int, group_size: int, cycle_bytes: int, repeats: int) -> dict:
    """Median seconds per call of each kernel for one (N, K) weight, cycling over copies of it, the formats
    interleaved."""
    ops = torch.ops.sambay_cpu
    x = torch.randn(1, k)
    copies = max(2, cycle_bytes // (n * k))  # counted in int8 bytes: the bf16 and int4 sets cycle as many copies
    w = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(copies)]
    q8 = [quant_ref.quantize_int8(t.float()) for t in w]
    grouped = k % group_size == 0  # as sambay.quant: a linear the group size does not divide stays dense
    q4 = [quant_ref.quantize_int4(t.float(), group_size) for t in w] if grouped else None

    def cycled(call):  # each call reads the next copy
        order = itertools.cycle(range(copies))
        return lambda: call(next(order))

    fns = {"bf16": cycled(lambda j: ops.linear_dense(x, w[j])), "int8": cycled(lambda j: ops.linear_int8(x, *q8[j]))}
    if grouped:
        fns["int4"] = cycled(lambda j: ops.linear_int4(x, *q4[j], group_size))
    seconds = {f: median(samples) for f, samples in interleaved(fns, repeats).items()}
    seconds.setdefault("int4", seconds["bf16"])  # the dense linear is what the int4 model runs there
    return {**seconds, "bytes": {"bf16": 2 * n * k, "int8": n * k, "int4": n * k // 2 if grouped else 2 * n * k}}


def time_decode(config: SambaYConfig, context: int, repeats: int) -> tuple[float, int]:
    """Seconds per call of the decode attention over a (1, 2, G, S, D) / (1, G, S, 2D) bf16 K/V, and its bytes."""
    d, groups = config.head_dim, config.num_key_value_heads // 2  # diff attention: kv pairs of two key stripes
    k = torch.randn(1, 2, groups, context, d, dtype=torch.bfloat16)
    v = torch.randn(1, groups, context, 2 * d, dtype=torch.bfloat16)
    rows = config.num_attention_heads // 2 // groups
    q = torch.randn(1, groups, 2, rows, d)
    lam, valid = torch.tensor([0.3]), torch.empty(0, dtype=torch.bool)
    call = {"attention": lambda: torch.ops.sambay_cpu.diff_decode(q, k, v, valid, lam, d**-0.5)}
    return median(interleaved(call, repeats)["attention"]), (k.numel() + v.numel()) * 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="phi4-mini-flash-reasoning", help="a shipped config name or config.json path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-size", type=int, default=128,
                   help="int4 group size (a linear it does not divide stays bf16, as in the model)")
    p.add_argument("--context", type=int, default=32768, help="keys of the decode attention")
    p.add_argument("--cycle-mib", type=int, default=64, help="the int8 bytes each shape's weight copies cover")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--bandwidth-mib", type=int, default=2048)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reason = cpu_probe()
    if reason is not None:
        print(f"bench_cpu_kernels: the CPU kernels are not available: {reason}")
        return 1
    config = SambaYConfig.from_dict(load_config(args.config))
    start = sum_bandwidth(args.bandwidth_mib)["gb_per_s"]
    print(f"bench_cpu_kernels: {args.config}, {args.threads} threads; read bandwidth (torch.sum fp32) at the start "
          f"{start:.1f} GB/s")
    totals = {f: 0.0 for f in ("bf16", "int8", "int4")}
    total_bytes = dict.fromkeys(totals, 0)
    for (n, k), count in sorted(linear_shapes(config).items(), key=lambda t: -t[0][0] * t[0][1] * t[1]):
        r = time_shape(n, k, args.group_size, args.cycle_mib * 2**20, args.repeats)
        cells = []
        for f in totals:
            totals[f] += r[f] * count
            total_bytes[f] += r["bytes"][f] * count
            cells.append(f"{f} {1e6 * r[f]:8.0f} us {r['bytes'][f] / r[f] / 1e9:5.1f} GB/s")
        print(f"  ({n:6d}, {k:5d}) x{count:3d}: " + " | ".join(cells))
    end = sum_bandwidth(args.bandwidth_mib)["gb_per_s"]
    bandwidth = max(start, end)
    print(f"the linears of one token (floors at the higher of the read bandwidths, {start:.1f} and {end:.1f} GB/s):")
    for f, s in totals.items():
        floor = total_bytes[f] / (bandwidth * 1e9)
        print(f"  {f}: {1e3 * s:7.1f} ms for {total_bytes[f] / 1e9:.3f} GB; floor {1e3 * floor:6.1f} ms; "
              f"{s / floor:.2f}x the floor")
    s, nbytes = time_decode(config, args.context, max(3, args.repeats // 3))
    print(f"decode attention at {args.context} keys: {1e3 * s:.2f} ms a layer for {nbytes / 1e6:.0f} MB, "
          f"{nbytes / s / 1e9:.1f} GB/s ({nbytes / s / 1e9 / bandwidth:.2f} of the read bandwidth)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
