"""Time sambay's fused kernels against their PyTorch twins and ``torch.compile`` of the twins.

For each op (silu_mul on the two halves of a fused tensor; the GMU gate) and each pass (forward, and
forward + backward) it prints the median time, the bytes the op must move at least, the achieved
bandwidth, and that bandwidth as a share of a measured device copy (``dst.copy_(src)`` moving the same
number of bytes). The GMU is a matmul, so it also gets TFLOP/s and a plain ``F.linear`` for scale.

    python -m benchmarks.bench_kernels            # CUDA: >= 16M-element sizes; CPU: small sizes
    python -m benchmarks.bench_kernels --quick    # fewer sizes, shorter runs (< 1 min on a 2-core CPU)

CUDA timings use ``triton.testing.do_bench`` (median, L2 flushed between runs); CPU timings are the
median of repeated wall-clock runs. The Triton kernels need CUDA; on CPU only the twins are timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sambay.kernels import gmu, gmu_ref, has_triton, silu_mul, silu_mul_ref

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ timing
def _timer(device: torch.device, quick: bool) -> Callable[[Callable[[], object]], float]:
    """Returns time(fn) -> median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        def cuda_time(fn):
            return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                           return_mode="median") / 1e3
        return cuda_time

    def cpu_time(fn):
        fn()                                             # warm-up (allocator, lazy init)
        times, budget = [], 0.15 if quick else 0.5
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return cpu_time


def copy_bandwidth(nbytes: int, dtype: torch.dtype, device: torch.device, time_fn) -> float:
    """Bytes/s of ``dst.copy_(src)`` where the copy reads and writes ``nbytes`` in total."""
    numel = max(1, nbytes // (2 * torch.empty((), dtype=dtype).element_size()))
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    return 2 * numel * src.element_size() / time_fn(lambda: dst.copy_(src))


# -------------------------------------------------------------------------------------------- impls
@dataclass
class Impl:
    name: str
    fn: Callable | None          # None: skipped, with ``note`` saying why
    note: str = ""


def implementations(twin: Callable, triton_fn_name: str, device: torch.device, compile_twin: str) -> list[Impl]:
    """The Triton kernel (CUDA only), the twin, and torch.compile of the twin."""
    impls = []
    if device.type == "cuda" and has_triton():
        op = silu_mul if triton_fn_name == "silu_mul" else gmu
        impls.append(Impl("triton", lambda *a: op(*a, backend="cuda")))
    impls.append(Impl("torch twin", twin))
    if compile_twin == "yes":
        impls.append(Impl("compile(twin)", torch.compile(twin, dynamic=False)))
    else:
        impls.append(Impl("compile(twin)", None, compile_twin))
    return impls


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    op: str
    pass_: str
    size: str
    run: dict[str, Callable[[], object]]     # impl name -> zero-arg callable
    nbytes: int                              # minimal bytes the pass must move
    flops: int = 0
    notes: dict[str, str] | None = None


def _silu_mul_cases(rows: int, c: int, dtype, device, impls: list[Impl]) -> list[Case]:
    """silu(u[:, :C]) * u[:, C:] on a fused (rows, 2C) tensor; backward w.r.t. both halves."""
    u = torch.randn(rows, 2 * c, device=device).to(dtype).requires_grad_()
    g = torch.randn(rows, c, device=device).to(dtype)
    elt, n = u.element_size(), rows * c
    fwd, fwdbwd, notes = {}, {}, {}
    for impl in impls:
        if impl.fn is None:
            notes[impl.name] = impl.note
            continue

        def f(fn=impl.fn):
            with torch.no_grad():
                return fn(u[:, :c], u[:, c:])

        def fb(fn=impl.fn):
            gate, value = u[:, :c], u[:, c:]
            return torch.autograd.grad(fn(gate, value), (gate, value), g)
        fwd[impl.name], fwdbwd[impl.name] = f, fb
    size = f"{rows}x{c} ({n / 2**20:.1f}M el)"
    return [Case("silu_mul", "fwd", size, fwd, 3 * n * elt, notes=notes),            # read 2, write 1
            Case("silu_mul", "fwd+bwd", size, fwdbwd, 8 * n * elt, notes=notes)]     # + read 3, write 2


def _gmu_cases(m: int, c: int, e: int, dtype, device, impls: list[Impl]) -> list[Case]:
    """silu(x @ W^T) * memory; backward w.r.t. x, W and memory. F.linear alone is timed for scale."""
    x = torch.randn(m, c, device=device).to(dtype).requires_grad_()
    w = (torch.randn(e, c, device=device) / c ** 0.5).to(dtype).requires_grad_()
    mem = torch.randn(m, e, device=device).to(dtype).requires_grad_()
    g = torch.randn(m, e, device=device).to(dtype)
    elt = x.element_size()
    fwd, fwdbwd, notes = {}, {}, {}
    all_impls = impls + [Impl("F.linear only", lambda x, w, mem: torch.nn.functional.linear(x, w))]
    for impl in all_impls:
        if impl.fn is None:
            notes[impl.name] = impl.note
            continue

        def f(fn=impl.fn):
            with torch.no_grad():
                return fn(x, w, mem)

        def fb(fn=impl.fn, linear_only=impl.name == "F.linear only"):
            inputs = (x, w) if linear_only else (x, w, mem)
            return torch.autograd.grad(fn(x, w, mem), inputs, g)
        fwd[impl.name], fwdbwd[impl.name] = f, fb
    size = f"{m}x{c}->{e}"
    fwd_bytes = (m * c + e * c + 2 * m * e) * elt                     # x, W, memory, out
    bwd_bytes = (2 * m * c + 2 * e * c + 3 * m * e) * elt             # x, W, memory, g; dx, dW, dmemory
    return [Case("gmu", "fwd", size, fwd, fwd_bytes, 2 * m * c * e, notes),
            Case("gmu", "fwd+bwd", size, fwdbwd, fwd_bytes + bwd_bytes, 6 * m * c * e, notes)]


# ---------------------------------------------------------------------------------------------- main
def _fmt_time(s: float) -> str:
    return f"{s * 1e3:8.3f} ms" if s >= 1e-3 else f"{s * 1e6:8.1f} us"


def _check(case: Case) -> str:
    """Max |triton - twin| before timing, so a broken kernel is not reported as fast."""
    if "triton" not in case.run or case.pass_ != "fwd":
        return ""
    a, b = case.run["triton"](), case.run["torch twin"]()
    return f"max|triton-twin| = {(a.float() - b.float()).abs().max().item():.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one size per op, shorter runs")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the twins")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU intra-op threads (on a busy machine, 1 gives steadier timings)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    time_fn = _timer(device, args.quick)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        silu_sizes = [(4096, 4096)] if args.quick else [(4096, 4096), (8192, 8192)]      # 16M, 64M per half
        gmu_sizes = [(4096, 2560, 5120)] if args.quick else [(4096, 2560, 5120), (16384, 2560, 5120)]
    else:
        name = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        silu_sizes = [(256, 1024)] if args.quick else [(512, 2048), (2048, 4096)]
        gmu_sizes = [(128, 256, 512)] if args.quick else [(512, 512, 1024)]
    if args.no_compile:
        compile_twin = "skipped (--no-compile)"
    elif device.type == "cpu" and args.quick:
        compile_twin = "skipped (--quick on CPU: inductor's C++ build takes 10-50 s; run without --quick)"
    else:
        compile_twin = "yes"

    print(f"device: {name}   dtype: {args.dtype}   torch {torch.__version__}"
          + (f"   TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}" if "TRITON_INTERPRET" in os.environ else ""))
    if device.type != "cuda":
        print("Triton kernels need CUDA: timing only the PyTorch twins (and torch.compile of them).")
    elif not has_triton():
        print("triton is not importable: timing only the PyTorch twins.")

    cases: list[Case] = []
    for rows, c in silu_sizes:
        impls = implementations(silu_mul_ref, "silu_mul", device, compile_twin)
        cases += _silu_mul_cases(rows, c, dtype, device, impls)
    for m, c, e in gmu_sizes:
        cases += _gmu_cases(m, c, e, dtype, device, implementations(gmu_ref, "gmu", device, compile_twin))

    header = f"{'op':9} {'pass':8} {'size':22} {'impl':14} {'time':>11} {'GB/s':>9} {'% copy':>7} " \
             f"{'TFLOP/s':>8} {'vs twin':>8}"
    print(header)
    print("-" * len(header))
    for case in cases:
        copy_bw = copy_bandwidth(case.nbytes, dtype, device, time_fn)
        check = _check(case)
        twin_s = None
        results = []
        for impl_name, fn in case.run.items():
            try:
                seconds = time_fn(fn)
            except Exception as exc:                   # e.g. torch.compile failing on this machine
                if impl_name != "compile(twin)":
                    raise
                print(f"{case.op:9} {case.pass_:8} {case.size:22} {impl_name:14} skipped: compile failed "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})")
                continue
            if impl_name == "torch twin":
                twin_s = seconds
            results.append((impl_name, seconds))
        for impl_name, seconds in results:
            bw = case.nbytes / seconds
            tflops = f"{case.flops / seconds / 1e12:8.2f}" if case.flops else f"{'':8}"
            speed = f"{twin_s / seconds:7.2f}x" if twin_s else f"{'':8}"
            print(f"{case.op:9} {case.pass_:8} {case.size:22} {impl_name:14} {_fmt_time(seconds):>11} "
                  f"{bw / 1e9:9.1f} {100 * bw / copy_bw:6.0f}% {tflops} {speed}")
        for impl_name, note in (case.notes or {}).items():
            print(f"{case.op:9} {case.pass_:8} {case.size:22} {impl_name:14} {note}")
        print(f"{'':9} {'':8} {'':22} {'copy_':14} {'':11} {copy_bw / 1e9:9.1f}   (same bytes: "
              f"{case.nbytes / 2**20:.1f} MiB)" + (f"   {check}" if check else ""))
    print("% copy: achieved bandwidth over dst.copy_(src) moving the same bytes. GMU is compute-bound at "
          "these sizes: read its TFLOP/s against 'F.linear only'.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
