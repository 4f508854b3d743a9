"""Time differential-attention decode (one query token per sequence) at SambaY's shapes (40 query heads,
10 kv pairs, head dim 64) over a cache-layout K/V that is a view of a longer buffer.

For each (batch, context) it prints the median time of: the Triton flash-decoding kernel (CUDA only),
its PyTorch twin, and two masked SDPA calls (one per map, each reading K and V: what a plain PyTorch CUDA
path does); the bytes the kernel moves beside the ideal (K and V read once, from diff_decode_bytes), the
bandwidth the ideal bytes imply, and that as a share of a measured device copy (target G5).

    python -m benchmarks.bench_diff_decode             # CUDA: batch 1 and 16, 512 to 32K context
    python -m benchmarks.bench_diff_decode --quick     # fewer sizes
    python -m benchmarks.bench_diff_decode --device cpu --quick   # the twin and SDPA only (small sizes)

CUDA timings use ``triton.testing.do_bench`` (median, L2 flushed); CPU timings are wall-clock medians.
Before timing, each implementation is compared with the twin so a broken kernel is not reported as fast.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sambay.kernels import has_triton
from sambay.kernels.diff_decode import diff_decode, diff_decode_bytes
from sambay.kernels.diff_decode.ref import diff_decode_ref

HQ, G, D = 40, 10, 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _timer(device: torch.device, quick: bool):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                                  return_mode="median") / 1e3

    def cpu_time(fn):
        fn()
        times, start = [], time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < (0.2 if quick else 1.0) and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return cpu_time


def _two_sdpa(q, k, v, valid, lam, scale):
    """Both maps as two masked SDPA calls (K stripe s and all of V read per call); D-wide q/k padded to
    V's 2D width so SDPA's fused kernels accept them (zero columns change no score)."""
    B = q.shape[0]
    qm = q.view(B, HQ // 2, 2, D)
    mask = valid[:, None, None, :]
    outs = [F.scaled_dot_product_attention(F.pad(qm[:, :, s, None], (0, D)), F.pad(k[:, s], (0, D)), v,
                                           attn_mask=mask, scale=scale, enable_gqa=True)[:, :, 0]
            for s in (0, 1)]
    return outs[0] - lam * outs[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    time_fn = _timer(device, args.quick)
    if device.type == "cuda":
        sizes = [(1, 32768), (16, 4096)] if args.quick else \
            [(1, 512), (1, 4096), (1, 32768), (1, 131072), (16, 512), (16, 4096), (16, 32768)]
        n = 1 << 28
        src = torch.empty(n, device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_bw = 2 * n / time_fn(lambda: dst.copy_(src))
        print(f"{torch.cuda.get_device_name(device)}, {args.dtype}; copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    else:
        sizes = [(1, 512), (1, 4096)] if args.quick else [(1, 512), (1, 4096), (1, 32768), (16, 4096)]
        copy_bw = None
        print(f"CPU, {torch.get_num_threads()} threads, {args.dtype}: the Triton kernel needs CUDA; twin and SDPA only")

    scale = D ** -0.5
    header = f"{'B':>3} {'context':>7} {'impl':>10} {'time':>11} {'ideal GB/s':>10} {'% copy':>6}  bytes kernel/ideal"
    print(header)
    for B, S in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, HQ, D, device=device, generator=gen).to(dtype)
        k = torch.randn(B, 2, G, S + 64, D, device=device, generator=gen).to(dtype)[:, :, :, :S]
        v = torch.randn(B, G, S + 64, 2 * D, device=device, generator=gen).to(dtype)[:, :, :S]
        valid = torch.ones(B, S, dtype=torch.bool, device=device)
        lam = torch.tensor(0.3, device=device)
        nbytes = diff_decode_bytes(B, HQ, G, S, D, dtype, device=device)
        call = (q, k, v, valid, lam, scale)
        impls = {"twin": lambda a=call: diff_decode_ref(*a), "2x SDPA": lambda a=call: _two_sdpa(*a)}
        if device.type == "cuda" and has_triton():
            impls = {"triton": lambda a=call: diff_decode(*a, backend="cuda"), **impls}
        with torch.no_grad():
            ref = impls["twin"]().float()
            for name, fn in impls.items():
                err = (fn().float() - ref).abs().max().item()
                t = time_fn(fn)
                bw = nbytes.ideal / t
                share = f"{100 * bw / copy_bw:5.0f}%" if copy_bw else "     -"
                extra = f"  {nbytes.kernel / 1e6:.2f} / {nbytes.ideal / 1e6:.2f} MB ({nbytes.num_splits} splits)" \
                    if name == "triton" else ""
                print(f"{B:>3} {S:>7} {name:>10} {t * 1e6:9.1f}us {bw / 1e9:10.1f} {share}{extra}"
                      f"  max|diff - twin| {err:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
