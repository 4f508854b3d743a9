"""The performance targets of docs/PERFORMANCE.md, their verdicts and plots, and the benchmarks behind them.

Run each as a module from the checkout root, e.g. ``python -m benchmarks.run --quick``: the measurements come
from :mod:`sambay.bench` (which every script imports; nothing here edits ``sys.path``), the targets and verdicts
from :mod:`benchmarks.targets`, and a measurement that needs its own process runs through
:func:`sambay.bench.run_worker`.

    run               C1-C7 (scaled CPU config against a same-shape Phi3)     targets, plots
    bench_real        R1-R6 (released config, random weights, bf16/int8/int4)
    bench_gpu         G1-G3, G5, G6 (one short GPU run); gpu_check: the GPU machine's checks
    bench_kernels     G4: the fused Triton kernels; bench_diff_decode: G5's kernel alone
    bench_cpu_kernels the C++ CPU kernels alone; bench_compiled: K1 (compiled decode)
"""
