"""Compile every Triton kernel the model launches for A100 (sm_80) and H100 (sm_90), without a GPU (target G7).

Triton's CPU interpreter accepts programs a GPU compiler rejects (a ``tl.dot`` layout, too much shared memory for
a tile, register spills in a hot loop). This check runs the real compiler instead, from the model's real call
sites: a compile-only Triton driver (:class:`CompileOnlyDriver`, ``triton.runtime.driver.set_active``) reports an
sm_80 or sm_90 target and launches nothing, so an ordinary ``kernel[grid](...)`` compiles the kernel (Triton IR,
PTX, then the ptxas shipped in the triton wheel) at the arguments the launch really has. The model runs on the
``meta`` device at the released config (no memory, no arithmetic), with the Triton fast paths switched on for
meta tensors inside :func:`forced_fast_paths` only (users' dispatch is never changed):

- prefill and training (forward + backward at ``PREFILL`` tokens): the GMU and gating kernels, forward and backward;
- decode, eager and static (graph-capturable) steps at batch 1 and 16 in a ``CAPACITY``-slot cache: the GMU and
  gating forward at decode rows, the differential decode split and reduce kernels, and mamba-ssm's Triton
  ``selective_state_update``;
- the odd shapes the kernel tests use (ragged tiles, small head dims, strided and fp32 operands), through the ops.

Each compiled kernel is recorded once per target with its constexprs, warps and stages, the shared memory
Triton allocates and what ``ptxas -v`` reports for its PTX (registers, spill stores and loads). The check
fails on a compile error, shared memory above the target's per-block opt-in limit, or any spill.

It needs Triton with the NVIDIA backend, and must run in a process where ``TRITON_INTERPRET`` is unset (the
interpreter replaces kernels when they are decorated): ``python3 -m sambay.kernels.compile_check`` prints the table
(``--json`` for records; ``--arch 90`` for one target), and :func:`run_check` runs it in such a subprocess.
mamba-ssm's compiled extension is not needed: only its Triton module is imported.

It lives in the package (not the tests) so a user can check their own Triton and ptxas before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["SHARED_LIMITS", "CompileOnlyDriver", "KernelRecord", "check", "forced_fast_paths", "format_table",
           "run_check"]

# Shared memory a block may use after opting in (cudaDevAttrMaxSharedMemoryPerBlockOptin), per compute capability:
# A100 163 KB, H100 227 KB (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability").
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "phi4-mini-flash-reasoning.json"
PREFILL = 2048            # prefill / training tokens (the paper's 2K prompts)
CAPACITY = 2048 + 32768   # decode cache slots: a 2K prompt with 32K tokens to generate


@dataclass
class KernelRecord:
    """One compiled kernel (one specialization) for one target, and the cases that launched it."""

    arch: int
    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    spec: str                       # pointer dtypes and the count of 16-divisible arguments
    shared: int                     # bytes of (dynamic) shared memory Triton allocates per block
    registers: int = -1             # per thread, from ptxas -v
    spill_stores: int = -1          # bytes
    spill_loads: int = -1
    stack: int = -1                 # bytes of stack frame
    cases: list[str] = field(default_factory=list)
    hash: str = ""

    def problems(self) -> list[str]:
        out = []
        if self.shared > SHARED_LIMITS[self.arch]:
            limit = SHARED_LIMITS[self.arch]
            out.append(f"shared memory {self.shared} B > the sm_{self.arch} per-block limit {limit} B")
        if self.spill_stores or self.spill_loads:
            out.append(f"register spills: {self.spill_stores} B stored, {self.spill_loads} B loaded")
        if self.registers < 0:
            out.append("ptxas reported no register count")
        return out


# --------------------------------------------------------------------------------------------- the driver
class _Launcher:
    """Built by Triton once per compiled kernel (``launcher_cls(src, metadata)``); records it, launches nothing."""

    def __init__(self, driver: CompileOnlyDriver, src, metadata):
        fn = src.fn
        names = fn.arg_names
        consts = {}
        for path, value in src.constants.items():
            name = names[path[0]] if isinstance(path, tuple) and len(path) == 1 else str(path)
            if fn.params[names.index(name)].is_constexpr if name in names else True:
                consts[name] = str(value) if not isinstance(value, (int, float, bool, type(None))) else value
        # pointer element types and how many arguments the JIT specialized as 16-divisible, which tell apart
        # two specializations with the same constexprs
        ptrs = [ty[1:] for ty in src.signature.values() if isinstance(ty, str) and ty.startswith("*")]
        aligned = sum(1 for attrs in src.attrs.values() if any(a[0] == "tt.divisibility" for a in attrs))
        self.record = KernelRecord(arch=driver.target.arch, kernel=metadata.name, constexprs=consts,
                                   spec=f"{','.join(dict.fromkeys(ptrs))} a{aligned}",
                                   num_warps=metadata.num_warps, num_stages=metadata.num_stages,
                                   shared=metadata.shared, hash=metadata.hash)
        self.driver = driver
        driver.records.append(self.record)

    def __call__(self, *args, **kwargs) -> None:
        case = self.driver.case
        if case not in self.record.cases:
            self.record.cases.append(case)


class _Utils:
    def __init__(self, driver: CompileOnlyDriver):
        self.driver = driver

    def get_device_properties(self, device) -> dict:
        # Triton refuses (OutOfResources) a kernel above this before "loading" it; we check it ourselves too.
        return {"max_shared_mem": SHARED_LIMITS[self.driver.target.arch]}

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads): placeholders; ptxas -v gives the real numbers.
        return object(), object(), 0, 0, 1024


def _make_driver_class():
    from triton.backends.driver import DriverBase

    class _CompileOnlyDriver(DriverBase):
        """A Triton driver for one NVIDIA target that compiles every launch and runs none."""

        @classmethod
        def is_active(cls) -> bool:
            return False  # never picked by Triton itself; only set_active() installs it

        def __init__(self, arch: int):
            from triton.backends.compiler import GPUTarget

            super().__init__()
            self.target = GPUTarget("cuda", arch, 32)
            self.records: list[KernelRecord] = []
            self.case = ""
            self.utils = _Utils(self)
            self.launcher_cls = lambda src, metadata: _Launcher(self, src, metadata)

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("the compile-only driver builds no launcher")

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("meta")

        # The JIT keys its per-device caches by this: one "device" per target keeps sm_80 and sm_90 apart.
        def get_current_device(self) -> int:
            return self.target.arch

        def set_current_device(self, device) -> None:
            pass

        def get_current_stream(self, device=None) -> int:
            return 0

        def get_benchmarker(self):
            raise NotImplementedError("the compile-only driver runs nothing")

    return _CompileOnlyDriver


def CompileOnlyDriver(arch: int):  # noqa: N802 - a class built lazily, so importing this module needs no Triton
    """A Triton driver whose target is ``GPUTarget("cuda", arch, 32)`` and whose launcher does nothing."""
    return _make_driver_class()(arch)


@contextlib.contextmanager
def compile_only(archs: tuple[int, ...]):
    """Make every Triton launch in the block compile for each ``sm_<arch>`` in turn and run nothing; yields the
    drivers. (One launch compiles for every target, so the model's code runs once for all of them.)"""
    from triton.runtime import driver as triton_driver
    from triton.runtime.jit import JITFunction

    drivers = [CompileOnlyDriver(arch) for arch in archs]
    previous = triton_driver._active  # None on a machine without a GPU (reset_active() would raise there)
    real_run = JITFunction.run

    def run_for_each_target(self, *args, grid, warmup, **kwargs):
        for drv in drivers:
            triton_driver.set_active(drv)
            kernel = real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return kernel

    JITFunction.run = run_for_each_target
    try:
        yield drivers
    finally:
        JITFunction.run = real_run
        triton_driver._active = previous


# ------------------------------------------------------------------------------------ forcing the fast paths
def _import_selective_state_update():
    """mamba-ssm's Triton decode step. Without its compiled extension (a CPU install) the package's __init__
    fails; its Triton modules need none of it, so they are then imported under a package without the __init__."""
    name = "mamba_ssm.ops.triton.selective_state_update"
    try:
        return importlib.import_module(name)
    except ImportError:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise
        for mod in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
            del sys.modules[mod]
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = pkg
        return importlib.import_module(name)


@contextlib.contextmanager
def forced_fast_paths():
    """Inside the block, meta tensors take the Triton fast paths (families gating, decode and the scan's decode
    step) as CUDA tensors do; the CUDA C++ paths (causal-conv1d, mamba-ssm's chunk scan, flash-attn) have no
    Triton code to compile and take their twins. Everything is restored on exit."""
    from sambay.kernels import dispatch
    from sambay.kernels.scan import cuda as scan_cuda
    from sambay.kernels.scan import twin as scan_twin

    _import_selective_state_update()
    saved_probes = dict(dispatch._PROBES)
    saved_on_cuda, saved_scan = dispatch.on_cuda, scan_cuda.selective_scan
    not_triton = "not compiled by the compile check (CUDA C++, no Triton)"
    dispatch._PROBES.update({family: None if family in (*dispatch._TRITON_FAMILIES, "scan") else not_triton
                             for family in dispatch.FAST_PATHS})
    dispatch.on_cuda = lambda *tensors: all(t.device.type == "meta" for t in tensors)
    scan_cuda.selective_scan = scan_twin.selective_scan   # the chunk scan is CUDA C++; its decode step is Triton
    # upstream's selective_state_update enters torch.cuda.device(x.device.index): None for a meta tensor
    real_device = torch.cuda.device
    torch.cuda.device = lambda idx: contextlib.nullcontext() if idx is None else real_device(idx)
    try:
        yield
    finally:
        dispatch._PROBES.clear()
        dispatch._PROBES.update(saved_probes)
        dispatch.on_cuda, scan_cuda.selective_scan = saved_on_cuda, saved_scan
        torch.cuda.device = real_device


# ------------------------------------------------------------------------------------------------- the cases
class _Cases:
    """Sets the name of the case now launching on every driver (``cases.case = ...``)."""

    def __init__(self, drivers):
        object.__setattr__(self, "drivers", drivers)

    def __setattr__(self, name, value):
        for drv in self.drivers:
            setattr(drv, name, value)


def _model_cases(drv, dtype: torch.dtype, prefill: int, capacity: int, parts: tuple[str, ...]) -> None:
    """The model's own launches at the released config on the meta device: ``parts`` of ("train", "decode")."""
    from sambay import SambaYForCausalLM
    from sambay.config import SambaYConfig

    cfg = SambaYConfig.from_json(CONFIG)
    name = str(dtype).removeprefix("torch.")
    model = SambaYForCausalLM(cfg, device="meta", dtype=dtype)
    h = cfg.hidden_size
    if "train" in parts:
        drv.case = f"train {name} T={prefill}"
        x = torch.empty(1, prefill, h, dtype=dtype, device="meta", requires_grad=True)
        model(inputs_embeds=x).logits.sum().backward()   # every position (training: no YOCO prefill skip)
    with torch.no_grad():
        for batch in (1, 16) if "decode" in parts else ():
            cache = model.allocate_cache(batch, capacity)
            drv.case = f"prefill {name} B={batch} T={prefill}"
            model(inputs_embeds=torch.empty(batch, prefill, h, dtype=dtype, device="meta"), cache=cache,
                  logits_to_keep=1)
            step = torch.empty(batch, 1, h, dtype=dtype, device="meta")
            drv.case = f"decode {name} B={batch} L={capacity}"
            model(inputs_embeds=step, cache=cache)
            drv.case = f"static decode {name} B={batch} L={capacity}"
            model(inputs_embeds=step, cache=cache, static=True)


def _odd_cases(drv, dtype: torch.dtype) -> None:
    """The odd shapes of tests/kernels (ragged tiles, small head dims, strided and fp32 operands) via the ops."""
    from sambay.kernels import gating
    from sambay.kernels.diff_decode.triton_diff_decode import diff_decode_triton
    from sambay.kernels.gating.triton_gmu import _gmu_bwd, _gmu_fwd

    name = str(dtype).removeprefix("torch.")

    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    drv.case = f"odd gating {name}"
    g = t(3, 5, 2 * 24)
    gating.silu_mul(g[..., :24], g[..., 24:], backend="cuda")                 # fused halves, C = 24
    gating.silu_mul(t(7, 33), t(7, 33, dt=torch.float32), backend="cuda")     # fp32 value
    x, w = t(5, 40), t(24, 40)
    drv.case = f"odd gmu {name}"
    for tiles in ({}, dict(block_m=16, block_n=16, block_k=16, group_m=2)):     # default and test_gmu's small tiles
        for mem in (t(5, 24), t(5, 24, dt=torch.float32)):
            _gmu_fwd(x, w, mem, **tiles)
            _gmu_bwd(x, w, mem, t(5, 24), **tiles)
    _gmu_bwd(x, w, t(5, 24), t(5, 24), False, True)                       # only dmemory needed
    drv.case = f"odd decode {name}"
    lam = t(1, dt=torch.float32)
    for B, Hq, G, S, D, geo in ((1, 4, 2, 37, 16, dict(block_n=16, num_splits=3)),
                                (2, 4, 1, 21, 12, dict(block_n=16, num_splits=2))):   # D = 12: padded widths
        valid = torch.empty(B, S, dtype=torch.bool, device="meta")
        length = torch.empty(1, dtype=torch.long, device="meta")
        diff_decode_triton(t(B, Hq, D), t(B, 2, G, S, D), t(B, G, S, 2 * D), valid, lam, D ** -0.5, length, **geo)
    valid = torch.empty(1, 37, dtype=torch.bool, device="meta")
    diff_decode_triton(t(1, 4, 16), t(1, 2, 2, 37, 16), t(1, 2, 37, 32), valid, 0.5, 0.25)   # a float lambda


# --------------------------------------------------------------------------------------------------- ptxas
def _ptxas() -> str:
    from triton import knobs

    return knobs.nvidia.ptxas.path


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_usage(rec: KernelRecord) -> None:
    """Fill the record's registers, spills and stack from ``ptxas -v`` on its PTX (the flags Triton uses)."""
    from triton.runtime.cache import get_cache_manager

    group = get_cache_manager(rec.hash).get_group(f"{rec.kernel}.json") or {}
    ptx = group.get(f"{rec.kernel}.ptx")
    if ptx is None:
        raise RuntimeError(f"compile check: no PTX of {rec.kernel} in Triton's cache (hash {rec.hash})")
    arch = f"sm_{rec.arch}{'a' if rec.arch >= 90 else ''}"
    out = subprocess.run([_ptxas(), "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={arch}", ptx,
                          "-o", os.devnull], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    for key, pattern in _PTXAS_RE.items():
        found = pattern.findall(log)
        setattr(rec, key, max((int(v) for v in found), default=0 if key != "registers" else -1))


# ---------------------------------------------------------------------------------------------------- check
PARTS = ("train", "decode", "odd")


def check(archs=(80, 90), dtypes=("bfloat16", "float16", "float32"), prefill: int = PREFILL,
          capacity: int = CAPACITY, parts: tuple[str, ...] = PARTS) -> list[KernelRecord]:
    """Compile every kernel the cases launch for each target; returns the records (ptxas usage filled in).
    parts: "train" (forward + backward at ``prefill`` tokens), "decode" (prefill into a ``capacity`` cache, then
    eager and static steps, batch 1 and 16), "odd" (the kernel tests' shapes).
    Must run where TRITON_INTERPRET is unset. A compile error propagates."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile check: TRITON_INTERPRET is set, so the kernels are interpreted, not compiled; "
                           "run `python3 -m sambay.kernels.compile_check` (or run_check()) without it")
    with forced_fast_paths(), compile_only(tuple(archs)) as drivers:
        cases = _Cases(drivers)
        for name in dtypes:
            dtype = getattr(torch, name)
            _model_cases(cases, dtype, prefill, capacity, parts)
            if "odd" in parts:
                _odd_cases(cases, dtype)
    records = [r for drv in drivers for r in drv.records]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # ptxas runs are separate processes
        list(pool.map(_ptxas_usage, records))
    return records


def _fmt_consts(c: dict) -> str:
    skip = {"INPUT_PRECISION"}
    return " ".join(f"{k}={v.removeprefix('fp') if isinstance(v, str) else v}" for k, v in c.items()
                    if k not in skip and not k.startswith("s_") and not k.endswith(("_sd", "_sn", "_stride")))


def format_table(records: list[KernelRecord]) -> str:
    """One row per compiled kernel and target: registers, spills, shared memory, and the cases that launched it."""
    head = f"{'arch':<6}{'kernel':<32}{'regs':>5}{'spill st/ld':>12}{'shared KB':>10}{'limit':>7}  {'w/s':<5}" \
           f"{'args':<22}{'constexprs':<60}cases"
    lines = [head, "-" * len(head)]
    for r in sorted(records, key=lambda r: (r.arch, r.kernel, json.dumps(r.constexprs, default=str))):
        flag = " !" if r.problems() else ""
        cases = "; ".join(r.cases[:3]) + (f" (+{len(r.cases) - 3})" if len(r.cases) > 3 else "")
        lines.append(f"sm_{r.arch:<3}{r.kernel:<32}{r.registers:>5}{f'{r.spill_stores}/{r.spill_loads}':>12}"
                     f"{r.shared / 1024:>10.1f}{SHARED_LIMITS[r.arch] // 1024:>7}  {f'{r.num_warps}/{r.num_stages}':<5}"
                     f"{r.spec:<22}{_fmt_consts(r.constexprs):<60} {cases}{flag}")
    bad = [(r, p) for r in records for p in r.problems()]
    lines.append(f"{len(records)} kernels compiled, {len(bad)} problems")
    lines += [f"  sm_{r.arch} {r.kernel} ({_fmt_consts(r.constexprs)}): {p}" for r, p in bad]
    return "\n".join(lines)


def run_check(args: list[str] = (), dtypes=("bfloat16", "float16", "float32"), timeout: float = 1800
              ) -> tuple[list[KernelRecord], str]:
    """Run the check in subprocesses without TRITON_INTERPRET (this process may hold interpreted kernels), one
    per dtype at once (the compiler is single-threaded). Returns (records, table); raises RuntimeError with a
    subprocess's stderr if it failed (a compile error)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-m", "sambay.kernels.compile_check", "--json", "--dtype", d, *args],
                              env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for d in dtypes]
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        if not out.strip().startswith("["):
            raise RuntimeError(f"compile check failed (exit {proc.returncode}):\n{err[-6000:]}")
        records += [KernelRecord(**r) for r in json.loads(out)]
    return records, format_table(records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMITS),
                   help="target compute capability (repeatable; default 80 and 90)")
    p.add_argument("--dtype", action="append", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--prefill", type=int, default=PREFILL)
    p.add_argument("--capacity", type=int, default=CAPACITY)
    p.add_argument("--part", action="append", choices=PARTS, help="which cases (repeatable; default all)")
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of the table")
    p.add_argument("--parallel", action="store_true", help="one subprocess per dtype (faster on several cores)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.parallel:
        extra = [f"--arch={x}" for x in a.arch or ()] + [f"--part={x}" for x in a.part or ()]
        records, table = run_check(extra + [f"--prefill={a.prefill}", f"--capacity={a.capacity}"],
                                   tuple(a.dtype or ("bfloat16", "float16", "float32")))
        print(table)
        print(f"({time.perf_counter() - t0:.0f} s)")
        return 1 if any(r.problems() for r in records) else 0
    records = check(tuple(a.arch or (80, 90)), tuple(a.dtype or ("bfloat16", "float16", "float32")), a.prefill,
                    a.capacity, tuple(a.part or PARTS))
    if a.json:
        print(json.dumps([asdict(r) for r in records], default=str))
    else:
        print(format_table(records))
        print(f"({time.perf_counter() - t0:.0f} s)")
    return 1 if any(r.problems() for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
