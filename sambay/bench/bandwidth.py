"""The read bandwidth that decode floors divide by: a C++ streaming read (``stream_read.cpp``: AVX-512 where the CPU
has it, same thread count, a 2 GiB buffer by default) beside ``torch.sum``'s figure.

``torch.sum`` is not the fastest read of the machine (on one host: 31.6 GB/s in bf16 and 37.5 in fp32 where a plain
AVX-512 read gave 35-74 GB/s within an hour), so a floor taken from it flatters every kernel compared with it.
The C++ read is built once per machine and CPU with the system's C++ compiler (``-O3 -march=native``, about a
second) into ``$SAMBAY_CACHE/kernels`` (default ``~/.cache/sambay/kernels``) and called through ctypes.

    python -m sambay.bench.bandwidth --threads 2      # both figures
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("stream_read.cpp")
_LIB: dict = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return ""


def _library() -> ctypes.CDLL:
    """The built read (cached per source, compiler and CPU flags: -march=native code only runs where it was built)."""
    if "lib" in _LIB:
        return _LIB["lib"]
    from sambay.kernels.cpu_native import cache_dir

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("the C++ streaming read needs a C++ compiler (g++, c++ or clang++ on PATH, or $CXX)")
    tag = hashlib.sha256(_SOURCE.read_bytes() + cxx.encode() + _cpu_flags().encode()).hexdigest()[:12]
    out = cache_dir() / f"stream_read-{tag}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", str(_SOURCE), "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"building the C++ streaming read failed ({' '.join(cmd)}): {r.stderr.strip()[:500]}")
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    lib.sambay_stream_read.restype = ctypes.c_uint64
    lib.sambay_stream_read.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_double)]
    lib.sambay_stream_read_width.restype = ctypes.c_int
    _LIB["lib"] = lib
    return lib


def stream_read_bandwidth(mib: int = 2048, threads: int | None = None, repeats: int = 5) -> dict:
    """The C++ read: ``threads`` (default torch's) threads each stream their share of a ``mib`` MiB fp32 buffer,
    ``repeats`` times after one untimed read. {"bytes", "samples_s", "gb_per_s" (median), "best_gb_per_s",
    "simd_bits" (512, 256 or 0), "threads"}."""
    lib = _library()
    threads = threads or torch.get_num_threads()
    seconds = (ctypes.c_double * repeats)()
    nbytes = lib.sambay_stream_read(mib * 2**20, threads, repeats, seconds)
    if nbytes == 0:
        raise MemoryError(f"the C++ streaming read could not allocate {mib} MiB")
    samples = list(seconds)
    return {"method": "C++ stream read", "bytes": nbytes, "samples_s": samples,
            "gb_per_s": nbytes / statistics.median(samples) / 1e9, "best_gb_per_s": nbytes / min(samples) / 1e9,
            "simd_bits": lib.sambay_stream_read_width(), "threads": threads}


def stream_read_or_error(mib: int = 2048, threads: int | None = None, repeats: int = 5) -> dict:
    """``stream_read_bandwidth``, or ``{"error": why}`` where the read cannot be built or run (no compiler)."""
    try:
        return stream_read_bandwidth(mib, threads, repeats)
    except (RuntimeError, OSError, MemoryError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def read_bandwidths(mib: int = 2048, threads: int | None = None, repeats: int = 5) -> dict:
    """Both reads, one buffer alive at a time: {"stream": stream_read_bandwidth or {"error"}, "sum":
    ``sambay.bench.measure.sum_bandwidth``, "floor_gb_per_s": the higher median}. A failed C++ build is reported, not
    raised: the floor is then torch.sum's."""
    from sambay.bench.measure import sum_bandwidth

    stream = stream_read_or_error(mib, threads, repeats)
    s = sum_bandwidth(mib, repeats)
    return {"stream": stream, "sum": s, "floor_gb_per_s": max(s["gb_per_s"], stream.get("gb_per_s", 0.0))}


def describe(bw: dict) -> str:
    st = bw["stream"]
    cxx = (f"C++ stream read ({st['simd_bits'] or 'scalar'}-bit, {st['threads']} threads) {st['gb_per_s']:.1f} GB/s"
           if "gb_per_s" in st else f"C++ stream read: {st['error']}")
    return f"{cxx}, torch.sum fp32 {bw['sum']['gb_per_s']:.1f} GB/s"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mib", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print("read bandwidth: " + describe(read_bandwidths(a.mib, a.threads, a.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
