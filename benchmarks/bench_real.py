"""Real-size CPU benchmark (issue 13): the released config with random weights in bf16, int8 and int4, against a
Phi-4-mini-shaped ``transformers.Phi3ForCausalLM`` in bf16, batch 1, each model in its own process.

    python -m benchmarks.bench_real                       # the released config: ~16 GB of RAM, the whole CPU
    python -m benchmarks.bench_real --config sambay-scaled-cpu    # the same measurements at the scaled size

The random-weight checkpoint is built once (``SambaYForCausalLM(config, dtype=torch.bfloat16)``, then
``save_pretrained``) into ``<--cache-dir>/<config name>-bf16`` and reused while it is complete and has the same
config. Then one process per model, one model alive at a time, ``--threads`` torch threads (on a quiet machine):

- bf16 / int8 / int4: ``SambaYForCausalLM.from_pretrained(dir, dtype=torch.bfloat16[, quantize="int8"|"int4"])``
  (a sambay without ``quantize=`` reports the quantized variants as not available): load time, peak RSS (VmHWM)
  over the checkpoint's file size, the weight bytes one decoded token reads; prefill tokens/s (one timed prefill
  per length after a 16-token warm-up, ``sambay.bench.measure.prefill_seconds``); seconds per decode step at each
  context from a random decode state, no prefill (``sambay.bench.measure.decode_step_seconds``: ``--warmup``
  untimed steps, then the median of ``--steps`` timed ones).
- phi3: built on the meta device and filled in place with random values (no init pass, no second copy), then the
  same measurements, decoding from a ``StaticCache`` with random K/V (``sambay.bench.subjects.Phi3``).
- the read bandwidth, here in the parent between workers, at the start and at the end: the median of 5 ``torch.sum``
  over a ``--bandwidth-mib`` fp32 buffer, the C++ streaming read of ``sambay.bench.bandwidth`` over as many bytes
  (and, for reference, a bf16 matrix-vector product over half as many bytes). A decode step's floor is its weight
  bytes over the highest of the ``torch.sum`` and C++ bandwidths.

Prefill at n tokens is measured by default as the last ``--prefill-chunk`` (256) tokens of an n-token prompt, after a
random state of n - 256 positions (``sambay.bench.measure.prefill_chunk_seconds``): the same weights and attention
spans as the end of a full prefill, in seconds instead of minutes. With ``--prefill-chunk 0`` whole prompts are
prefilled, and the lengths after the first run last, in a second process per model, within ``--budget-s`` (0: no limit,
and every length runs in the first process): skipped when the time predicted from the first length does not fit,
stopped when the budget runs out. Prints a table of every measurement, the ratios, the targets R1-R6 (PASS/MISSED at
the released size and the sizes they name, NOT AT TARGET SIZE otherwise), and writes every number to ``--out``.
"""

from __future__ import annotations

# OpenMP's wait policy in the workers: ACTIVE by default (--omp-wait-policy; "env" leaves the environment's): this
# benchmark needs the whole machine, where spinning threads are the fastest (docs/PERFORMANCE.md, sambay.bench.workers).
import argparse
import inspect
import json
import operator
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks import targets as T
from sambay.bench.measure import bandwidth
from sambay.bench.workers import WAIT_POLICIES, peak_rss
from sambay.bench.workers import run_worker as _run_worker
from sambay.bench.workers import write_result as _write_json

RELEASED = "phi4-mini-flash-reasoning"
VARIANTS = ("bf16", "int8", "int4", "phi3")
QUANTIZE = {"bf16": None, "int8": "int8", "int4": "int4"}
# Phi-4-mini (microsoft/Phi-4-mini-instruct) as a plain Phi3ForCausalLM: the baseline at the released size.
PHI4_MINI = {"vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
             "num_attention_heads": 24, "num_key_value_heads": 8, "max_position_embeddings": 131072,
             "tie_word_embeddings": True, "pad_token_id": 199999, "bos_token_id": 199999, "eos_token_id": 199999}
SHORT, LONG, PROMPT = 512, 32768, 2048  # the sizes the targets name
PREDICTION_MARGIN = 1.15  # a longer prefill is predicted as (its tokens / the measured one's) x this
RESTART_S = 15.0  # a worker's start before it loads (imports: transformers' Phi3 alone took ~12 s here)
END_RESERVE_S = 15.0  # what the run needs after the last prefill (the second bandwidth measurement, the report)


# ------------------------------------------------------------------------------------------------ the workers
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def weight_bytes_per_token(model: torch.nn.Module) -> dict:
    """Bytes of weights one decoded token reads: every parameter and buffer once (tied weights once), except the
    embedding matrix, of which one row is read; when the LM head is tied to it, the matrix is read once in full."""
    emb = model.get_input_embeddings().weight
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # both iterators skip duplicates
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    emb_bytes, row = emb.numel() * emb.element_size(), emb.shape[1] * emb.element_size()
    tied = sum(p is emb for _, p in model.named_parameters(remove_duplicate=False)) > 1
    return {"model_bytes": total, "embedding_bytes": emb_bytes, "embedding_row_bytes": row, "head_tied": tied,
            "bytes_per_token": (total if tied else total - emb_bytes) + row,
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})}


def sambay_state_read_bytes(config, context: int, dtype: torch.dtype) -> int:
    """Decode-state bytes one step reads at ``context``: every Mamba state and sliding ring once, the shared K/V
    of ``context`` + 1 positions once per layer that attends to it (the full-attention and cross layers)."""
    from sambay import SambaYCache

    cache = SambaYCache(config, 1, context + 1, dtype=dtype, device="meta")
    readers = sum(r in ("full_attention", "cross_attention") for r in config.layer_types)
    total = 0
    for role, layer in zip(config.layer_types, cache.layers):
        nbytes = sum(t.numel() * t.element_size() for t in vars(layer).values()) if layer is not None else 0
        total += nbytes * readers if role == "full_attention" else nbytes
    return total


def phi3_state_read_bytes(config, context: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * (context + 1)
            * torch.empty((), dtype=dtype).element_size())


def phi3_config(spec: dict):
    """The baseline's ``transformers.Phi3Config``: Phi-4-mini's shape, or the same shape as the sambay config."""
    import transformers

    from sambay.bench.subjects import phi3_config as same_shape

    if spec["phi3_shape"] == "same":
        return same_shape(spec["config"])
    pc = transformers.Phi3Config(**PHI4_MINI)
    pc._attn_implementation = "sdpa"
    return pc


@torch.no_grad()
def build_phi3(config, dtype: torch.dtype, seed: int):
    """A ``Phi3ForCausalLM`` with random weights, without HF's init pass or a second copy: built on the meta
    device, then each parameter (a tied one once) allocated and filled: norms with ones, the rest with normal
    values of std ``initializer_range`` tiled from one 16M-value block (the cost of a step does not depend on the
    values; filling 3.8B values one by one would take ~40 s on 2 cores). The rotary buffers are rebuilt."""
    import transformers

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = transformers.Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator().manual_seed(seed)
    block = torch.empty(1 << 24, dtype=dtype).normal_(0.0, config.initializer_range, generator=g)
    new: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in new:
                t = torch.empty(p.shape, dtype=p.dtype)
                if t.dim() == 1:
                    t.fill_(1.0)
                else:
                    flat = t.view(-1)
                    for i in range(0, flat.numel(), block.numel()):
                        n = min(block.numel(), flat.numel() - i)
                        flat[i:i + n].copy_(block[:n])
                new[id(p)] = torch.nn.Parameter(t, requires_grad=False)
            setattr(module, name, new[id(p)])
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"build_phi3: tensors left on the meta device: {meta}")
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("build_phi3: the LM head is no longer tied to the embedding")
    return model.eval()


class NotAvailable(Exception):
    """A variant this sambay cannot build (e.g. ``from_pretrained`` without ``quantize=``)."""


def load_sambay(directory: str, quantize: str | None):
    from sambay import SambaYForCausalLM

    if quantize is None:  # not passed at all: works with a from_pretrained that has no quantize= argument
        return SambaYForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    if "quantize" not in inspect.signature(SambaYForCausalLM.from_pretrained).parameters:
        raise NotAvailable("SambaYForCausalLM.from_pretrained has no quantize= argument in this sambay")
    try:
        return SambaYForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, quantize=quantize)
    except TypeError as e:
        raise NotAvailable(f"from_pretrained(quantize={quantize!r}) raised TypeError: {e}") from None


def measure_model(spec: dict, result: dict, save) -> None:
    """Load (or build) one model, then its decode steps and prefills; ``save()`` after every measurement, so a
    worker that dies midway still leaves what it measured."""
    from sambay.bench.measure import decode_step_seconds, prefill_chunk_seconds, prefill_seconds
    from sambay.bench.subjects import Phi3, SambaY

    variant = spec["variant"]
    if variant == "phi3":
        import transformers

        transformers.Phi3ForCausalLM  # noqa: B018  (its lazy import, seconds, is not the model's build time)
    base = peak_rss()
    t0 = time.perf_counter()
    if variant == "phi3":
        config = phi3_config(spec)
        model = build_phi3(config, torch.bfloat16, spec["seed"])
        subject = Phi3.from_model(model)
        state_bytes = lambda n: phi3_state_read_bytes(config, n, torch.bfloat16)  # noqa: E731
    else:
        model = load_sambay(spec["checkpoint"], QUANTIZE[variant])
        subject = SambaY.from_model(model)
        state_bytes = lambda n: sambay_state_read_bytes(model.config, n, model.dtype)  # noqa: E731
        config = model.config
    load_s = time.perf_counter() - t0
    peak = peak_rss()
    weights = weight_bytes_per_token(model)
    file_bytes = spec.get("file_bytes") if variant != "phi3" else None
    result["load"] = {"what": "random init (meta + in-place fill)" if variant == "phi3" else "from_pretrained",
                      "seconds": load_s, "base_rss": base, "peak_rss": peak, "rss_growth": peak - base,
                      "file_bytes": file_bytes}
    result["weights"] = weights
    result["shape"] = _shape(config)
    result.update(decode=[], prefill=[])
    save()
    log(f"  {variant}: {'built' if variant == 'phi3' else 'loaded'} in {load_s:.1f} s, peak RSS "
        f"{peak / 1e9:.2f} GB, {weights['bytes_per_token'] / 1e9:.3f} GB of weights per token")
    if spec["prompts"]:
        prefill_seconds([subject], 16, 1, warmup=0)  # first-call costs (allocator, kernels) out of the timing
    for n in spec["contexts"]:
        d = decode_step_seconds([subject], 1, n, repeats=spec["steps"], steps=1, warmup=spec["warmup"])
        samples = d["samples_s"][subject.name]
        result["decode"].append({"context": n, "samples_s": samples, "median_s": statistics.median(samples),
                                 "state_read_bytes": state_bytes(n)})
        save()
        log(f"  {variant}: decode step at context {n}: {1e3 * statistics.median(samples):.1f} ms")
    chunk = spec.get("prefill_chunk", 0)
    for n in spec["prompts"]:
        if chunk and chunk < n:  # the last `chunk` tokens of an n-token prompt, after a random state of n - chunk
            s = prefill_chunk_seconds(subject, n, chunk)
            result["prefill"].append({"tokens": n, "chunk": chunk, "seconds": s, "tokens_per_s": chunk / s})
            log(f"  {variant}: prefill of tokens {n - chunk}..{n} of a {n}-token prompt: {s:.2f} s "
                f"({chunk / s:.1f} tokens/s)")
        else:
            p = prefill_seconds([subject], n, 1, warmup=0)
            s = p["samples_s"][subject.name][0]
            result["prefill"].append({"tokens": n, "seconds": s, "tokens_per_s": n / s})
            log(f"  {variant}: prefill {n} tokens: {s:.2f} s ({n / s:.1f} tokens/s)")
        save()
    result["peak_rss_end"] = peak_rss()


def _shape(c) -> str:
    return (f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads}/"
            f"{c.num_key_value_heads} heads, intermediate {c.intermediate_size}, vocab {c.vocab_size}")


def worker(spec_path: str) -> int:
    """Run one job of the parent (``--worker spec.json``) and write its result JSON to ``spec["result"]``."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    result: dict = {"kind": spec["kind"], "variant": spec.get("variant"), "status": "running", "pid": os.getpid()}
    save = lambda: _write_json(Path(spec["result"]), result)  # noqa: E731
    try:
        if spec["kind"] == "build":
            from sambay import SambaYConfig, SambaYForCausalLM

            t0 = time.perf_counter()
            torch.manual_seed(spec["seed"])
            model = SambaYForCausalLM(SambaYConfig.from_dict(spec["config"]), dtype=torch.bfloat16)
            result["init_s"] = time.perf_counter() - t0
            model.save_pretrained(spec["checkpoint"])
            result["seconds"] = time.perf_counter() - t0
        else:
            measure_model(spec, result, save)
        result["status"] = "ok"
    except NotAvailable as e:
        result.update(status="not available", reason=str(e))
    except Exception as e:  # reported in the results; the other models still run
        result.update(status="error", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        save()
        log(traceback.format_exc())
        return 1
    save()
    return 0


# ------------------------------------------------------------------------------------------------ the parent
def run_worker(spec: dict, label: str, tmp: Path, start: float, timeout: float | None = None) -> dict:
    """``spec`` in a worker process of this module (:func:`sambay.bench.run_worker`)."""
    return _run_worker("benchmarks.bench_real", spec, label, tmp,
                       lambda msg: log(f"[{time.perf_counter() - start:6.1f}s] {msg}"), timeout)


def checkpoint_problem(directory: Path, config: dict) -> str | None:
    """Why the cached checkpoint cannot be reused (None: it can): incomplete (the save is atomic: config.json is
    written last, so config.json plus the files it names means complete), another architecture, or not bf16."""
    import dataclasses

    from sambay import SambaYConfig
    from sambay.checkpoint import CheckpointError, checkpoint_files

    if not (directory / "config.json").is_file():
        return "no config.json"
    try:
        checkpoint_files(directory)
        want, have = SambaYConfig.from_dict(config), SambaYConfig.from_pretrained(directory)
    except (CheckpointError, OSError, ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    if have.torch_dtype != "bfloat16" or getattr(have, "quantization_config", None) is not None:
        return f"not a plain bf16 checkpoint (torch_dtype {have.torch_dtype!r})"
    diff = [f.name for f in dataclasses.fields(SambaYConfig)  # the fields that define the model (as == does)
            if f.compare and f.name != "torch_dtype" and getattr(want, f.name) != getattr(have, f.name)]
    return f"another config (differs in {', '.join(diff)})" if diff else None


def ensure_checkpoint(args, config: dict, name: str, job) -> dict:
    directory = Path(args.cache_dir).expanduser() / f"{name}-bf16"
    problem = checkpoint_problem(directory, config)
    info = {"dir": str(directory), "built": problem is not None, "reason": problem}
    if problem is not None:
        log(f"checkpoint {directory}: building it ({problem})")
        r = job({"kind": "build", "checkpoint": str(directory)}, "build the random-weight checkpoint")
        info.update(status=r["status"], reason=r.get("reason", problem), build_s=r["wall_s"])
        if r["status"] != "ok":
            return info
    else:
        log(f"checkpoint {directory}: reusing it")
    info["status"] = "ok"
    info["file_bytes"] = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return info


def _ints(option: str, text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--{option}: expected comma-separated integers >= 1, got {text!r}")
    return values


def _names(option: str, text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"--{option}: expected distinct names from {', '.join(VARIANTS)}, got {text!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=RELEASED, help="a shipped config name (sambay.bench.CONFIGS, e.g. "
                   "sambay-scaled-cpu for a development run) or a config.json path")
    p.add_argument("--variants", default=",".join(VARIANTS), help="models to measure, in this order")
    p.add_argument("--contexts", default="512,4096,32768", help="decode contexts (random decode states)")
    p.add_argument("--prompts", default="512,2048", help="prefill lengths; all but the first are budget-gated")
    p.add_argument("--prefill-variants", default="bf16,phi3", help="the variants whose prefill is measured")
    p.add_argument("--prefill-chunk", type=int, default=256, help="measure a prompt of n tokens by its last this many "
                   "tokens, after a random state of n - chunk positions (tokens/s = chunk / seconds); 0: the whole "
                   "prompt from an empty cache (a 2K bf16 prefill of the Phi3 baseline takes ~15 min on 2 cores)")
    p.add_argument("--steps", type=int, default=3, help="timed decode steps per context (their median is used)")
    p.add_argument("--warmup", type=int, default=1, help="untimed decode steps before them")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    p.add_argument("--budget-s", type=float, default=900.0, help="the longer prefills are skipped or stopped "
                   "where they would take the run past this many seconds (0: no limit)")
    p.add_argument("--omp-wait-policy", choices=WAIT_POLICIES, default="ACTIVE",
                   help="OMP_WAIT_POLICY for the workers (env: the environment's; unset is OpenMP's spin-then-sleep)")
    p.add_argument("--bandwidth-mib", type=int, default=2048, help="the torch.sum buffer of the bandwidth test")
    p.add_argument("--phi3-shape", choices=("auto", "phi4-mini", "same"), default="auto", help="the baseline's "
                   "shape: Phi-4-mini, or the same as the sambay config (auto: phi4-mini for the released config)")
    p.add_argument("--cache-dir", default="~/.cache/sambay/bench-real",
                   help="where the random-weight checkpoint is kept (<cache-dir>/<config name>-bf16)")
    p.add_argument("--out", default="bench-real.json", help="the JSON file of every number and verdict")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    from sambay.bench.subjects import CONFIGS, load_config
    from sambay.bench.timing import machine

    try:
        config = load_config(args.config)
        variants = _names("variants", args.variants)
        prefill_variants = [v for v in _names("prefill-variants", args.prefill_variants) if v in variants]
        contexts, prompts = _ints("contexts", args.contexts), _ints("prompts", args.prompts)
        if min(args.steps, args.threads, args.bandwidth_mib) < 1 or min(args.warmup, args.budget_s,
                                                                         args.prefill_chunk) < 0:
            raise ValueError("--steps, --threads, --bandwidth-mib: expected >= 1; --warmup, --budget-s, "
                             "--prefill-chunk: >= 0")
    except (ValueError, FileNotFoundError) as e:
        print(f"bench_real: {e}", file=sys.stderr)
        return 2
    name = args.config if args.config in CONFIGS else Path(args.config).resolve().stem
    if name == "config":  # a checkpoint's config.json: name it by its directory
        name = Path(args.config).resolve().parent.name
    phi3_shape = args.phi3_shape if args.phi3_shape != "auto" else ("phi4-mini" if name == RELEASED else "same")
    worker_policy = (os.environ.get("OMP_WAIT_POLICY") or "unset") if args.omp_wait_policy == "env" \
        else args.omp_wait_policy
    settings = {"config": name, "released": name == RELEASED, "variants": variants, "contexts": contexts,
                "prompts": prompts, "prefill_variants": prefill_variants, "steps": args.steps, "warmup": args.warmup,
                "threads": args.threads, "budget_s": args.budget_s, "bandwidth_mib": args.bandwidth_mib,
                "prefill_chunk": args.prefill_chunk, "phi3_shape": phi3_shape, "batch": 1,
                "worker_omp_wait_policy": worker_policy}
    torch.set_num_threads(args.threads)  # for the bandwidth measurements, here
    results = {"script": "benchmarks.bench_real", "argv": sys.argv[1:] if argv is None else list(argv),
               "environment": machine("cpu", args.threads), "settings": settings, "models": {}, "workers": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        measure_all(args, config, results, Path(tmp), start)
    results["bandwidth"] = summarize_bandwidth(results.pop("bandwidth_runs"))
    results["environment"]["loadavg_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    derive(results)
    results["targets"] = judge(results)
    results["wall_s"] = time.perf_counter() - start
    print(report(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out, results)
    print(f"results: {out} (wall time {results['wall_s']:.0f} s)")
    return 1 if any(w["status"] == "error" for w in results["workers"]) else 0


def measure_all(args, config: dict, results: dict, tmp: Path, start: float) -> None:
    """The bandwidth, the checkpoint (built if needed), one worker per model, the longer prefills, the bandwidth."""
    s = results["settings"]
    base = {"threads": s["threads"], "config": config, "phi3_shape": s["phi3_shape"], "seed": 0, "steps": s["steps"],
            "warmup": s["warmup"], "prefill_chunk": s["prefill_chunk"],
            "omp_wait_policy": None if args.omp_wait_policy == "env" else args.omp_wait_policy}
    gated = s["budget_s"] and not s["prefill_chunk"]  # full prefills after the first length: budget-gated

    def job(spec: dict, label: str, timeout: float | None = None) -> dict:
        r = run_worker({**base, **spec}, label, tmp, start, timeout)
        results["workers"].append({"label": label, "status": r["status"], "wall_s": r["wall_s"]})
        return r

    results["bandwidth_runs"] = [measure_bandwidth(args, "start", start)]
    checkpoint: dict = {}
    if any(v in QUANTIZE for v in s["variants"]):
        checkpoint = results["checkpoint"] = ensure_checkpoint(args, config, s["config"], job)
    for v in s["variants"]:
        if v in QUANTIZE and checkpoint.get("status") != "ok":
            results["models"][v] = {"status": "error", "reason": f"no checkpoint: {checkpoint.get('reason')}"}
            continue
        prompts = (s["prompts"][:1] if gated else s["prompts"]) if v in s["prefill_variants"] else []
        spec = {"kind": "model", "variant": v, "contexts": s["contexts"], "prompts": prompts,
                "checkpoint": checkpoint.get("dir"), "file_bytes": checkpoint.get("file_bytes")}
        results["models"][v] = job(spec, f"{v}: load, decode at {args.contexts}, prefill {prompts}")
    if gated:
        longer_prefills(results, s["prefill_variants"], s["prompts"], s["budget_s"], start, job)
    results["bandwidth_runs"].append(measure_bandwidth(args, "end", start))


def longer_prefills(results: dict, variants: list[str], prompts: list[int], budget: float, start: float,
                    job) -> None:
    """The prefill lengths after the first, in a second worker per variant, within the budget: a length whose
    time predicted from the first one (scaled by tokens, x PREDICTION_MARGIN; attention's quadratic part makes
    the truth longer on small models) plus a reload does not fit is skipped, and the worker is stopped when the
    budget (less END_RESERVE_S) runs out, keeping the lengths it finished."""
    for v in variants:
        m = results["models"].get(v, {})
        if m.get("status") != "ok" or not m.get("prefill") or len(prompts) < 2:
            continue
        first, reload_s = m["prefill"][0], m["load"]["seconds"] + RESTART_S
        todo, predicted = [], 0.0
        skipped = m.setdefault("prefill_skipped", [])
        for n in prompts[1:]:
            guess = first["seconds"] * n / first["tokens"] * PREDICTION_MARGIN
            elapsed = time.perf_counter() - start
            if elapsed + reload_s + predicted + guess + END_RESERVE_S > budget:
                skipped.append({"tokens": n, "predicted_s": guess, "reason": f"predicted {guess:.0f} s would take "
                                f"the run past --budget-s {budget:.0f} (elapsed {elapsed:.0f} s)"})
                log(f"  {v}: prefill {n} tokens skipped: {skipped[-1]['reason']}")
                continue
            todo.append(n)
            predicted += guess
        if not todo:
            continue
        spec = {"kind": "model", "variant": v, "contexts": [], "prompts": todo,
                "checkpoint": results.get("checkpoint", {}).get("dir"),
                "file_bytes": results.get("checkpoint", {}).get("file_bytes")}
        left = budget - (time.perf_counter() - start) - END_RESERVE_S
        r = job(spec, f"{v}: prefill {todo}", timeout=left)
        done = {p["tokens"] for p in r.get("prefill", [])}
        m["prefill"] += r.get("prefill", [])
        skipped += [{"tokens": n, "reason": f"worker {r['status']}: {r.get('reason')}"} for n in todo if n not in done]


def measure_bandwidth(args, when: str, start: float) -> dict:
    """In this process (no model is alive here; the buffers are freed before the next worker starts)."""
    r = {"when": when, **bandwidth(args.bandwidth_mib)}
    log(f"[{time.perf_counter() - start:6.1f}s] read bandwidth ({when}): C++ stream read "
        f"{_gbs(r['stream_cpp'])}, torch.sum fp32 {r['sum_fp32']['gb_per_s']:.1f} GB/s, bf16 matrix-vector "
        f"{r['gemv_bf16']['gb_per_s']:.1f} GB/s")
    return r


def _gbs(r: dict) -> str:
    return f"{r['gb_per_s']:.1f} GB/s" if "gb_per_s" in r else f"not measured ({r.get('error')})"


def summarize_bandwidth(bw: list[dict]) -> dict:
    sums = [r["sum_fp32"]["gb_per_s"] for r in bw]
    streams = [r.get("stream_cpp", {}).get("gb_per_s") for r in bw]
    return {"runs": bw, "sum_fp32_gb_per_s": sums, "stream_cpp_gb_per_s": streams,
            "gemv_bf16_gb_per_s": [r["gemv_bf16"]["gb_per_s"] for r in bw],
            # the fastest read measured: the floor is the fastest a step could physically be
            "floor_gb_per_s": max(sums + [x for x in streams if x is not None])}


def derive(results: dict) -> None:
    """Floors and ratios from the raw numbers (in place): per model, the weight floor and step/floor at every
    context (also with the decode state's reads); across models, the ratios the targets use."""
    bw = results["bandwidth"]["floor_gb_per_s"]
    for m in results["models"].values():
        if m.get("status") != "ok":
            continue
        w = m["weights"]["bytes_per_token"]
        m["floor_s"] = w / (bw * 1e9) if bw else None
        load = m["load"]
        if load.get("file_bytes"):
            load["peak_rss_over_file"] = load["peak_rss"] / load["file_bytes"]
            load["rss_growth_over_file"] = load["rss_growth"] / load["file_bytes"]
        load["rss_growth_over_model_bytes"] = load["rss_growth"] / m["weights"]["model_bytes"]
        for d in m["decode"]:
            d["floor_with_state_s"] = (w + d["state_read_bytes"]) / (bw * 1e9) if bw else None
            d["over_floor"] = d["median_s"] / m["floor_s"] if bw else None
            d["over_floor_with_state"] = d["median_s"] / d["floor_with_state_s"] if bw else None
    ratios = {}
    bf16 = _steps(results, "bf16")
    if bf16:
        lo, hi = min(bf16), max(bf16)
        ratios[f"bf16 decode step {hi} / {lo}"] = bf16[hi] / bf16[lo]
    for v in ("int8", "int4", "phi3"):
        other = _steps(results, v)
        for n in sorted(bf16.keys() & other.keys()):
            key = f"{v} decode step / bf16, context {n}" if v == "phi3" else f"bf16 decode step / {v}, context {n}"
            ratios[key] = other[n] / bf16[n] if v == "phi3" else bf16[n] / other[n]
    a, b = _prefill(results, "bf16"), _prefill(results, "phi3")
    for n in sorted(a.keys() & b.keys()):
        ratios[f"prefill tokens/s bf16 / phi3, {n} tokens"] = a[n] / b[n]
    results["ratios"] = ratios


def _steps(results: dict, v: str) -> dict[int, float]:
    m = results["models"].get(v, {})
    return {d["context"]: d["median_s"] for d in m.get("decode", [])} if m.get("status") == "ok" else {}


def _prefill(results: dict, v: str) -> dict[int, float]:
    m = results["models"].get(v, {})
    return {p["tokens"]: p["tokens_per_s"] for p in m.get("prefill", [])} if m.get("status") == "ok" else {}


OPS = {"<=": operator.le, ">=": operator.ge}


def judge(results: dict) -> list[dict]:
    """R1-R6 (batch 1), numbered as docs/PERFORMANCE.md, their bounds from benchmarks.targets. Each target has one
    or two parts (ratio, op, bound); it PASSes when every part does, else it is MISSED. R5 (loading) is the load's
    RSS growth over the loaded model's bytes (parameters and buffers), of the worst sambay variant this run loaded.
    Measured at other sizes than the ones it names (another config, other contexts/prompts, another baseline shape):
    NOT MEASURED AT TARGET SIZE, with what it would be; a part that could not be measured: NOT MEASURED."""
    s = results["settings"]
    steps = {v: _steps(results, v) for v in VARIANTS}
    ctx = sorted(set().union(*(d.keys() for d in steps.values()))) or [0]
    short = SHORT if SHORT in ctx else ctx[0]
    long = LONG if LONG in ctx else ctx[-1]
    pre = {v: _prefill(results, v) for v in ("bf16", "phi3")}
    common = sorted(pre["bf16"].keys() & pre["phi3"].keys())
    prompt = PROMPT if PROMPT in common else (common[-1] if common else PROMPT)
    floors = {v: results["models"].get(v, {}).get("floor_s") for v in VARIANTS}

    def step(v, n):
        return steps[v].get(n)

    def div(a, b):
        return a / b if a is not None and b else None

    def why(v, what):
        m = results["models"].get(v)
        if m is None:
            return f"{v}: not in --variants"
        if m.get("status") != "ok":
            return f"{v}: {m.get('status')} ({m.get('reason')})"
        return f"{v}: {what} not measured"

    # R5: every sambay variant this run loaded, judged by the worst (the most RSS growth per byte of model)
    loads = {v: m["load"]["rss_growth"] / m["weights"]["model_bytes"] for v in ("bf16", "int8", "int4")
             if (m := results["models"].get(v, {})).get("status") == "ok" and "load" in m and "weights" in m}
    worst = max(loads, key=loads.get) if loads else None
    rows = [
        ("R1", f"sambay bf16 decode step / its floor, context {short}", {"bf16": [short]},
         [(div(step("bf16", short), floors["bf16"]), "r1_bf16_over_floor")], {"short": short}),
        ("R2", f"bf16 step / int8 step, and int8 step / its floor, context {short}", {"bf16": [short], "int8": [short]},
         [(div(step("bf16", short), step("int8", short)), "r2_bf16_over_int8"),
          (div(step("int8", short), floors["int8"]), "r2_int8_over_floor")], {"short": short}),
        ("R3", f"bf16 step / int4 step, and int4 step / its floor, context {short}", {"bf16": [short], "int4": [short]},
         [(div(step("bf16", short), step("int4", short)), "r3_bf16_over_int4"),
          (div(step("int4", short), floors["int4"]), "r3_int4_over_floor")], {"short": short}),
        ("R4", f"prefill tokens/s, sambay bf16 / Phi3, {prompt} tokens", {},
         [(div(pre["bf16"].get(prompt), pre["phi3"].get(prompt)), "r4_prefill_vs_phi3")], {"prompt": prompt}),
        ("R5", "load RSS growth / the loaded model's bytes, the worst of "
         + (", ".join(f"{v} {r:.3f}" for v, r in loads.items()) or "no variant"), {},
         [(loads.get(worst), "r5_rss_growth_over_model")], {}),
        ("R6", f"sambay bf16 decode step, context {long} / {short}, and Phi3 bf16 / sambay bf16 at {long}",
         {"bf16": [short, long], "phi3": [long]},
         [(div(step("bf16", long), step("bf16", short)), "r6_long_over_short"),
          (div(step("phi3", long), step("bf16", long)), "r6_phi3_over_bf16")], {"short": short, "long": long}),
    ]
    out = []
    for tid, what, needs, keyed, at in rows:
        parts = [(value, T.BY_KEY[key].op, T.BY_KEY[key].bound) for value, key in keyed]
        missing = list(dict.fromkeys(why(v, f"decode at {n}") for v, ns in needs.items() for n in ns
                                     if step(v, n) is None))
        if tid == "R4":
            missing = [why(v, f"prefill at {prompt}") for v in ("bf16", "phi3") if prompt not in pre[v]]
        if tid == "R5" and not loads:
            missing = [why(v, "load") for v in ("bf16", "int8", "int4") if v in results["models"]]
            missing = missing or ["no sambay variant in --variants"]
        if any(p[0] is None for p in parts) and not missing:
            missing = ["no bandwidth measurement (no floor)"]
        passed = None if missing else all(OPS[op](value, bound) for value, op, bound in parts)
        off = [f"config {s['config']} (not {RELEASED})"] if not s["released"] else []
        off += [f"{k} {v} (target: {dict(short=SHORT, long=LONG, prompt=PROMPT)[k]})" for k, v in at.items()
                if v != dict(short=SHORT, long=LONG, prompt=PROMPT)[k]]
        if tid in ("R4", "R6") and s["phi3_shape"] != "phi4-mini":
            off.append(f"baseline shape {s['phi3_shape']} (target: phi4-mini)")
        side = T.PASS if passed else T.MISSED
        verdict = T.NOT_MEASURED if missing else f"{T.NOT_AT_SIZE} (would be {side})" if off else side
        out.append({"id": tid, "what": what, "parts": [{"value": v, "op": op, "bound": b} for v, op, b in parts],
                    "at": at, "passed": passed, "verdict": verdict, "not_measured": missing, "off_size": off})
    return out


# ------------------------------------------------------------------------------------------------ the report
def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 2**20:.2f} MiB"


def _sec(s) -> str:
    return "-" if s is None else f"{1e3 * s:.1f} ms" if s < 1 else f"{s:.2f} s"


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def report(results: dict) -> str:
    s, env, bw = results["settings"], results.get("environment", {}), results["bandwidth"]
    cols = [v for v in s["variants"]]
    models = results["models"]
    lines = [f"bench_real: {s['config']}, batch 1, {s['threads']} threads (workers' OMP_WAIT_POLICY "
             f"{s.get('worker_omp_wait_policy')}); {env.get('cpu')} ({env.get('cpu_count')} "
             f"CPUs); torch {env.get('torch')}, transformers {env.get('transformers')}; load average "
             f"{env.get('loadavg_start')} -> {env.get('loadavg_end')}",
             "read bandwidth (start, end; the floor uses the highest): C++ stream read "
             + ", ".join("-" if x is None else f"{x:.1f}" for x in bw.get("stream_cpp_gb_per_s", []))
             + " GB/s, torch.sum fp32 " + ", ".join(f"{x:.1f}" for x in bw["sum_fp32_gb_per_s"])
             + " GB/s, bf16 matrix-vector "
             + ", ".join(f"{x:.1f}" for x in bw["gemv_bf16_gb_per_s"]) + " GB/s"]
    ck = results.get("checkpoint")
    if ck:
        how = f"built in {ck['build_s']:.0f} s" if "build_s" in ck else "reused"
        lines.append(f"checkpoint: {ck['dir']} ({_gb(ck.get('file_bytes'))}, {how})")
    for v in cols:
        m = models.get(v, {})
        if m.get("status") != "ok":
            lines.append(f"{v}: {m.get('status')}: {m.get('reason')}")
        elif v == "phi3":
            lines.append(f"phi3: transformers.Phi3ForCausalLM, {m['shape']}, tied, sdpa, StaticCache decode")
    rows: list[tuple] = [("measurement", *cols)]

    def row(label, fn):
        cells = []
        for v in cols:
            m = models.get(v, {})
            try:
                cells.append(fn(m) if m.get("status") == "ok" else "-")
            except (KeyError, TypeError, StopIteration):
                cells.append("-")
        rows.append((label, *cells))

    row("load / build time", lambda m: _sec(m["load"]["seconds"]))
    row("peak RSS after load", lambda m: _gb(m["load"]["peak_rss"]))
    row("peak RSS / checkpoint file", lambda m: _x(m["load"].get("peak_rss_over_file")))
    row("RSS growth / checkpoint file", lambda m: _x(m["load"].get("rss_growth_over_file")))
    row("RSS growth / model bytes", lambda m: _x(m["load"]["rss_growth_over_model_bytes"]))
    row("weight bytes read per token", lambda m: _gb(m["weights"]["bytes_per_token"]))
    row("floor (weights / bandwidth)", lambda m: _sec(m["floor_s"]))
    for n in s["prompts"]:
        row(f"prefill {n} tokens: tokens/s", lambda m, n=n: next(
            f"{p['tokens_per_s']:.1f} ({_sec(p['seconds'])})" for p in m["prefill"] if p["tokens"] == n))
    for n in s["contexts"]:
        row(f"decode step, context {n}", lambda m, n=n: next(_sec(d["median_s"]) for d in m["decode"]
                                                            if d["context"] == n))
        row("  / floor", lambda m, n=n: next(_x(d["over_floor"]) for d in m["decode"] if d["context"] == n))
        row("  / floor with state reads", lambda m, n=n: next(
            f"{_x(d['over_floor_with_state'])} (+{_gb(d['state_read_bytes'])})" for d in m["decode"]
            if d["context"] == n))
    row("peak RSS at the end", lambda m: _gb(m["peak_rss_end"]))
    row("worker wall time", lambda m: _sec(m["wall_s"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for v in cols:
        for p in models.get(v, {}).get("prefill_skipped", []):
            lines.append(f"{v}: prefill {p['tokens']} tokens not measured: {p['reason']}")
    if results["ratios"]:
        lines.append("ratios:")
        lines += [f"  {k}: {r:.3f}" for k, r in results["ratios"].items()]
    lines.append("targets (batch 1):")
    for t in results["targets"]:
        values = ", ".join("-" if p["value"] is None else f"{p['value']:.3f} {p['op']} {p['bound']}"
                           for p in t["parts"])
        note = "; ".join(t["not_measured"] or t["off_size"])
        lines.append(f"  {t['id']} {t['what']}: {values}  {t['verdict']}" + (f"  [{note}]" if note else ""))
    lines.append("workers: " + ", ".join(f"{w['label'].split(':')[0]} {w['wall_s']:.0f} s" for w in results["workers"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
