"""Every Triton kernel the model launches compiles for sm_80 and sm_90 without spills or too much shared memory
(target G7), checked without a GPU by :mod:`sambay.kernels.compile_check` in subprocesses (no TRITON_INTERPRET).

bf16 and fp32 at the released config's shapes plus the kernel tests' odd shapes; fp16 takes bf16's code paths
(``python3 -m sambay.kernels.compile_check`` runs all three). About 2.5 minutes on a 2-core CPU, cold Triton cache.
"""

from __future__ import annotations

import pytest

EXPECTED = {"_gmu_fwd_kernel", "_gmu_bwd_kernel", "_silu_mul_fwd_kernel", "_silu_mul_bwd_kernel", "_split_kernel",
            "_reduce_kernel", "_selective_scan_update_kernel"}


@pytest.mark.slow
def test_every_kernel_compiles_for_a100_and_h100():
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip("the compile-only driver is written against Triton 3.7's driver API")
    from sambay.kernels.compile_check import run_check

    records, table = run_check(dtypes=("bfloat16", "float32"))
    print(table)
    for arch in (80, 90):
        assert {r.kernel for r in records if r.arch == arch} == EXPECTED, table
    # the cases that matter were compiled: training backward at 2K tokens, the static step with its length
    assert any(r.kernel == "_gmu_bwd_kernel" and r.constexprs.get("BLOCK_M") == 128 for r in records), table
    assert any(r.kernel == "_split_kernel" and r.constexprs.get("HAS_LEN") for r in records), table
    problems = [(r.arch, r.kernel, p) for r in records for p in r.problems()]
    assert not problems, table
