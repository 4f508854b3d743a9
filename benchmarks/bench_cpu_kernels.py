"""sambay's CPU decode kernels at a config's shapes: every linear of one decoded token in bf16, int8 and int4 (and
int8/int4 with 8-bit activations), beside ATen's and FBGEMM's kernels for the same formats, and the decode attention
over the shared K/V, against the read bandwidth measured in the same run.

    python -m benchmarks.bench_cpu_kernels                          # the released config (~1.5 GB of buffers)
    python -m benchmarks.bench_cpu_kernels --config configs/sambay-tiny.json --context 64   # a smoke run

The linears' shapes come from the model itself, built on the meta device (no weights): each distinct (N, K) is
timed on random weights with one activation row, the call cycling over enough copies of the weight (``--cycle-mib``)
that none is in cache, as in a decode step where each linear's weight was last read a whole token ago. The median
call time (the formats interleaved) times the number of linears of that shape sums to the linears' share of one
token. The decode attention is timed at ``--context`` keys with the shared K/V's shape. The read bandwidth is
``sambay.bench.bandwidth.read_bandwidths`` (a C++ streaming read and ``torch.sum`` over a ``--bandwidth-mib``
buffer, the same threads) at the start and at the end; the floors use the fastest read, as in
``benchmarks.bench_real``.
Prints GB/s per shape and each subject's total as a ratio to its bytes over the bandwidth: near 1, the kernel
streams at the memory's speed; above it, arithmetic or access patterns bound it. Subjects: sambay's kernels as
"auto" picks them (AVX-512 where the CPU has it) and their AVX2 variants ("... avx2"); ATen's ``F.linear`` (bf16),
``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu`` (sambay's int4 converted: w = (q - 8) s + z) and FBGEMM's
dynamic W8A8 ``quantized.linear_dynamic`` (``--no-peers`` leaves those out), then each peer's total over sambay's.
Run it on a quiet machine (``--threads``, default 2).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
import time

import torch

from sambay import SambaYConfig, SambaYForCausalLM
from sambay.bench import load_config
from sambay.bench.bandwidth import describe, read_bandwidths
from sambay.bench.timing import interleaved, median
from sambay.kernels.dispatch import cpu_probe
from sambay.kernels.linear import ref as quant_ref
from sambay.layers.linear import Linear


def linear_shapes(config: SambaYConfig) -> collections.Counter:
    """(N, K) -> how many linears of one decode step have that weight shape (the LM head included)."""
    model = SambaYForCausalLM(config, device="meta", dtype=torch.bfloat16)
    return collections.Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, Linear))


# The subjects timed at each shape: sambay's kernels (the variant "auto" picks, and the AVX2 one beside it where the
# CPU has AVX-512), and the maintained kernels PyTorch ships for the same formats. Each entry: name -> (format,
# bytes per weight). "a8": 8-bit activations (sambay: per 32 columns; FBGEMM: per tensor, dynamic).
SUBJECTS = {
    "bf16": ("bf16", 2), "bf16 avx2": ("bf16", 2), "aten bf16": ("bf16", 2),
    "int8": ("int8", 1), "int8 avx2": ("int8", 1), "aten int8": ("int8", 1),
    "int8 a8": ("int8", 1), "int8 a8 avx2": ("int8", 1), "fbgemm int8 a8": ("int8", 1),
    "int4": ("int4", 0.5), "int4 avx2": ("int4", 0.5), "aten int4": ("int4", 0.5),
    "int4 a8": ("int4", 0.5), "int4 a8 avx2": ("int4", 0.5),
}
PEERS = ("aten bf16", "aten int8", "fbgemm int8 a8", "aten int4")


def aten_int4(q4: tuple, group_size: int) -> tuple:
    """sambay's int4 (w = q s + m) in ATen's CPU layout for _weight_int4pack_mm_for_cpu (w = (q - 8) s + z): the same
    codes and scales, z = m + 8 s rounded to bf16 (so ATen's product differs from sambay's by that rounding)."""
    qweight, scales, mins = q4
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(quant_ref.unpack_int4(qweight).to(torch.int32), 1)
    zeros = (mins.float() + 8 * scales.float()).to(torch.bfloat16)
    return packed, torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()  # (K/G, N, 2)


def fbgemm_int8(q8: tuple):
    """sambay's int8 weight as FBGEMM's packed per-channel qint8 (the same codes and scales), or None."""
    import warnings

    qweight, scales = q8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch, still the API FBGEMM takes
        zero_points = torch.zeros_like(scales, dtype=torch.long)
        w = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(w, None)


def time_shape(n: int, k: int, group_size: int, cycle_bytes: int, repeats: int, peers: bool = True,
               clock=time.perf_counter) -> dict:
    """Median seconds per call of each subject for one (N, K) weight, cycling over copies of it, all interleaved.
    Activations are one row: fp32 for sambay's fp32-activation kernels, bf16 where the model passes bf16 (sambay's
    bf16 linear, and ATen's kernels, which take bf16)."""
    ops = torch.ops.sambay_cpu
    x = torch.randn(1, k)
    xb = x.bfloat16()
    copies = max(2, cycle_bytes // (n * k))  # counted in int8 bytes: the bf16 and int4 sets cycle as many copies
    w = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(copies)]
    q8 = [quant_ref.quantize_int8(t.float()) for t in w]
    grouped = k % group_size == 0  # as sambay.quant: a linear the group size does not divide stays dense
    q4 = [quant_ref.quantize_int4(t.float(), group_size) for t in w] if grouped else None
    wide = "avx512" in {i.split("+")[0] for i in ops.isas()}
    G = group_size

    def cycled(call):  # each call reads the next copy
        order = itertools.cycle(range(copies))
        return lambda: call(next(order))

    fns = {"bf16": lambda j: ops.linear_dense(xb, w[j]), "int8": lambda j: ops.linear_int8(x, *q8[j]),
           "int8 a8": lambda j: ops.linear_int8_a8(x, *q8[j])}
    if grouped:
        fns |= {"int4": lambda j: ops.linear_int4(x, *q4[j], G), "int4 a8": lambda j: ops.linear_int4_a8(x, *q4[j], G)}
    if wide:
        fns |= {"bf16 avx2": lambda j: ops.linear_dense(xb, w[j], "avx2"),
                "int8 avx2": lambda j: ops.linear_int8(x, *q8[j], "avx2"),
                "int8 a8 avx2": lambda j: ops.linear_int8_a8(x, *q8[j], "avx2")}
        if grouped:
            fns |= {"int4 avx2": lambda j: ops.linear_int4(x, *q4[j], G, "avx2"),
                    "int4 a8 avx2": lambda j: ops.linear_int4_a8(x, *q4[j], G, "avx2")}
    if peers:
        s8 = [s.to(torch.bfloat16) for _, s in q8]
        fb = [fbgemm_int8(t) for t in q8]
        fns |= {"aten bf16": lambda j: torch.nn.functional.linear(xb, w[j]),
                "aten int8": lambda j: torch.ops.aten._weight_int8pack_mm(xb, q8[j][0], s8[j]),
                "fbgemm int8 a8": lambda j: torch.ops.quantized.linear_dynamic(x, fb[j], False)}
        if grouped and n % 16 == 0:  # ATen's int4 packing takes N in multiples of 16
            a4 = [aten_int4(t, G) for t in q4]
            fns["aten int4"] = lambda j: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, a4[j][0], G, a4[j][1])
    timed = interleaved({f: cycled(c) for f, c in fns.items()}, repeats, clock=clock)
    seconds = {f: median(samples) for f, samples in timed.items()}
    if not grouped:  # the dense linear is what the int4 model runs there
        dense = {"int4": "bf16", "int4 a8": "bf16", "int4 avx2": "bf16 avx2", "int4 a8 avx2": "bf16 avx2",
                 "aten int4": "aten bf16"}
        seconds |= {f: seconds[d] for f, d in dense.items() if d in seconds}
    nbytes = {f: int((SUBJECTS[f][1] if grouped or SUBJECTS[f][0] != "int4" else 2) * n * k) for f in seconds}
    return {"seconds": seconds, "bytes": nbytes}


def time_decode(config: SambaYConfig, context: int, repeats: int, clock=time.perf_counter) -> tuple[dict, int]:
    """Seconds per call of the decode attention over a (1, 2, G, S, D) / (1, G, S, 2D) bf16 K/V (queries exactly
    bf16, as a bf16 model's), per instruction-set variant the CPU has, interleaved; and the K/V bytes."""
    d, groups = config.head_dim, config.num_key_value_heads // 2  # diff attention: kv pairs of two key stripes
    k = torch.randn(1, 2, groups, context, d, dtype=torch.bfloat16)
    v = torch.randn(1, groups, context, 2 * d, dtype=torch.bfloat16)
    rows = config.num_attention_heads // 2 // groups
    q = torch.randn(1, groups, 2, rows, d).bfloat16().float()
    lam, valid = torch.tensor([0.3]), torch.empty(0, dtype=torch.bool)
    calls = {isa: (lambda isa=isa: torch.ops.sambay_cpu.diff_decode(q, k, v, valid, lam, d**-0.5, isa))
             for isa in (i.split("+")[0] for i in torch.ops.sambay_cpu.isas())}
    return {f: median(t) for f, t in interleaved(calls, repeats, clock=clock).items()}, (k.numel() + v.numel()) * 2


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
    p.add_argument("--no-peers", action="store_true", help="time sambay's kernels only (not ATen's and FBGEMM's)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: the calling thread's CPU time (only with --threads 1; for a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    reason = cpu_probe()
    if reason is not None:
        print(f"bench_cpu_kernels: the CPU kernels are not available: {reason}")
        return 1
    config = SambaYConfig.from_dict(load_config(args.config))
    first = read_bandwidths(args.bandwidth_mib, args.threads)
    start = first["floor_gb_per_s"]
    print(f"bench_cpu_kernels: {args.config}, {args.threads} threads; read bandwidth at the start: {describe(first)}")
    totals: dict[str, float] = collections.defaultdict(float)
    total_bytes: dict[str, int] = collections.defaultdict(int)
    missing: dict[str, list] = collections.defaultdict(list)  # subject -> the shapes it cannot take
    for (n, k), count in sorted(linear_shapes(config).items(), key=lambda t: -t[0][0] * t[0][1] * t[1]):
        r = time_shape(n, k, args.group_size, args.cycle_mib * 2**20, args.repeats, peers=not args.no_peers,
                       clock=clock)
        cells = []
        missing |= {f: missing[f] + [(n, k)] for f in SUBJECTS if f not in r["seconds"] and (f in totals or not
                                                                                            args.no_peers)}
        for f, sec in r["seconds"].items():
            totals[f] += sec * count
            total_bytes[f] += r["bytes"][f] * count
            cells.append(f"{f} {1e6 * sec:.0f} us ({r['bytes'][f] / sec / 1e9:.1f} GB/s)")
        print(f"  ({n:6d}, {k:5d}) x{count:3d}: " + " | ".join(cells))
    last = read_bandwidths(args.bandwidth_mib, args.threads)
    end = last["floor_gb_per_s"]
    bandwidth = max(start, end)
    print(f"read bandwidth at the end: {describe(last)}")
    print(f"the linears of one token (floors at the higher of the fastest reads, {start:.1f} and {end:.1f} GB/s):")
    for f in SUBJECTS:
        if f not in totals or missing.get(f):
            if missing.get(f):
                print(f"  {f}: cannot take every shape (not {missing[f]}), no total")
            continue
        floor = total_bytes[f] / (bandwidth * 1e9)
        s = totals[f]
        print(f"  {f}: {1e3 * s:7.1f} ms for {total_bytes[f] / 1e9:.3f} GB; floor {1e3 * floor:6.1f} ms; "
              f"{s / floor:.2f}x the floor")
    for peer in PEERS:
        mine = peer.split(" ", 1)[1]
        if peer in totals and mine in totals and not missing.get(peer):
            print(f"  {peer} / sambay {mine}: {totals[peer] / totals[mine]:.2f}x the time")
    seconds, nbytes = time_decode(config, args.context, max(3, args.repeats // 3), clock)
    for isa, s in seconds.items():
        print(f"decode attention at {args.context} keys ({isa}): {1e3 * s:.2f} ms a layer for {nbytes / 1e6:.0f} MB, "
              f"{nbytes / s / 1e9:.1f} GB/s ({nbytes / s / 1e9 / bandwidth:.2f} of the read bandwidth)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
