"""Loading a SambaY causal LM from a checkpoint, and saving one: the model side of :mod:`sambay.checkpoint`.

Loading builds the model on the meta device (its initialisers skipped for that build only, by a torch-function
mode: every value is overwritten by the checkpoint, and running the initialisers on meta tensors imports
torch._dynamo, ~150 MiB of RSS) and assigns each tensor as it is read, so peak memory stays close to the
checkpoint's size. The keys must match the model exactly (strict: missing, unexpected and wrong-shaped keys are
listed), tensors are converted one at a time only when a dtype change is asked for, and each is screened for
NaN/inf. A tied head takes the embedding (a stored copy must equal it).

Quantized weights (:mod:`sambay.quant`): a checkpoint whose config.json has sambay's ``quantization_config``
builds QuantLinear modules and reads their buffers (``<module>.qweight``, ``.scales``, ``.mins``) exactly as
stored (int8/uint8/bf16/fp32, no cast). ``quantize=`` quantizes a float checkpoint while loading: each dense weight
of a quantized module is quantized as soon as it is read and then dropped, so the peak stays near the quantized
model plus one dense tensor.

Saving gathers the tensors and config.json and hands them to :func:`sambay.checkpoint.write`, the one writer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from sambay import checkpoint as ckpt
from sambay import quant
from sambay.checkpoint import CheckpointError, probe_path, resolve_checkpoint
from sambay.config import DTYPE_NAMES, SambaYConfig

__all__ = ["CheckpointError", "from_pretrained", "probe_path", "resolve_checkpoint", "save_pretrained"]

# The fills of torch.nn.init that the modules' constructors call; skipped while a model is built on meta.
_INITS = tuple(getattr(torch.nn.init, n) for n in ("uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_",
                                                   "xavier_uniform_", "xavier_normal_", "trunc_normal_", "zeros_",
                                                   "ones_", "constant_"))


class _NoInit(TorchFunctionMode):
    """Inside this mode (this thread, this block only) torch.nn.init's fills return their tensor untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INITS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def _check_keys(model: torch.nn.Module, headers: list[tuple[dict, int]], files: list[Path]) -> None:
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected.update({n: tuple(b.shape) for n, b in model.named_buffers()})
    found: dict[str, tuple[tuple, Path]] = {}
    for path, (header, _) in zip(files, headers):
        for name, info in header.items():
            found[ckpt.RENAMES.get(name, name)] = (tuple(info["shape"]), path)
    tied = "lm_head.weight" if model.config.tie_word_embeddings else None
    problems = []
    for name in sorted(expected.keys() - found.keys()):
        problems.append(f"  missing: {name} (expected shape {list(expected[name])})")
    for name in sorted(found.keys() - expected.keys()):
        if name == tied and found[name][0] == expected.get("model.embed_tokens.weight"):
            continue  # a stored copy of the tied head: accepted if it equals the embedding (checked on load)
        problems.append(f"  unexpected: {name} (shape {list(found[name][0])}, in {found[name][1].name})")
    for name in sorted(expected.keys() & found.keys()):
        if expected[name] != found[name][0]:
            problems.append(f"  wrong shape: {name}: expected {list(expected[name])}, found {list(found[name][0])} "
                            f"(in {found[name][1].name})")
    if problems:
        raise CheckpointError(f"checkpoint does not match the model built from its config.json "
                              f"({len(problems)} problem(s)):\n" + "\n".join(problems))


def _target_dtype(name: str, param: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    # A_log, D and the lambda vectors are fp32 parameters by construction; keep them fp32.
    return param.dtype if param.dtype == torch.float32 else dtype


def _resolve_dtype(dtype, config: SambaYConfig) -> torch.dtype:
    """None / "auto": the checkpoint's torch_dtype (float32 when it has none); else a float dtype or its name."""
    if dtype is None or dtype == "auto":
        return getattr(torch, config.torch_dtype) if config.torch_dtype else torch.float32
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in DTYPE_NAMES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPE_NAMES)} (or a torch float dtype, or None for "
                             f"the checkpoint's), got {dtype!r}")
        return getattr(torch, name)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch float dtype, its name, or None, got {type(dtype).__name__}")
    if dtype not in [getattr(torch, n) for n in DTYPE_NAMES]:
        raise ValueError(f"dtype: expected a float dtype the model computes in ({', '.join(DTYPE_NAMES)}), got {dtype}")
    return dtype


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but CUDA is not available here (torch.cuda.is_available()"
                             f" is False); expected 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}: expected an index below torch.cuda.device_count()="
                             f"{torch.cuda.device_count()}")
    return dev


def _nonfinite_problem(name: str, stored: torch.Tensor, loaded: torch.Tensor, path: Path) -> str:
    nan, inf = ckpt.nonfinite_counts(loaded)
    where = f"{name} (in {path.name})"
    if stored.dtype != loaded.dtype and ckpt.nonfinite_counts(stored) == (0, 0):
        return (f"  {where}: {inf} value(s) became inf when cast from {stored.dtype} to {loaded.dtype} (beyond "
                f"{loaded.dtype}'s range, max |x| = {float(stored.abs().max()):.4g})")
    return f"  {where}: {nan} NaN and {inf} inf value(s)"


def _view(buffer: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    return buffer[:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


class _Scratch:
    """Two buffers reused for the dense weights quantized as they are read (``infos``: their header entries): one
    to read into, one for the cast to the model dtype (CPU). Reading each into a fresh allocation and freeing it
    once quantized fragments the heap, and glibc keeps the holes resident: on a 338 MB bf16 checkpoint the int8 peak
    was 1.7x the quantized model's bytes, 1.1-1.25x with the two buffers."""

    def __init__(self, infos: dict[str, dict], dtype: torch.dtype, device: torch.device):
        self.infos, self.dtype, self.device = infos, dtype, device
        numel = {n: math.prod(i["shape"]) for n, i in infos.items()}
        stored = {n: ckpt.DTYPES[i["dtype"]] for n, i in infos.items()}
        self.raw = torch.empty(max((numel[n] * stored[n].itemsize for n in infos), default=0), dtype=torch.uint8)
        cast = [numel[n] * dtype.itemsize for n in infos if stored[n] != dtype and device.type == "cpu"]
        self.cast = torch.empty(max(cast, default=0), dtype=torch.uint8)

    def read_buffer(self, name: str) -> torch.Tensor | None:
        info = self.infos.get(name)
        return None if info is None else _view(self.raw, info["shape"], ckpt.DTYPES[info["dtype"]])

    def to_model(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == self.dtype or self.device.type != "cpu":
            return t.to(device=self.device, dtype=self.dtype)
        return _view(self.cast, t.shape, self.dtype).copy_(t)  # the same rounding as t.to(dtype)


def _resolve_quantize(quantize, group_size, stored: quant.QuantizationConfig | None, directory: Path,
                      activations=None):
    """(weights, group_size, activations) to quantize while loading, or None (a float load, or a checkpoint already
    in the asked format). Quantizing quantized weights again is refused: the roundings would compound."""
    if quantize is None:
        if group_size is not None:
            raise ValueError(f"group_size: only with quantize='int4', got group_size={group_size!r} without quantize")
        if activations is not None and stored is None:
            raise ValueError(f"activations={activations!r}: only for quantized weights (quantize='int8' or 'int4', "
                             f"or a quantized checkpoint)")
        return None
    if stored is None:
        return quant.resolve(quantize, group_size, activations)
    if quantize != stored.weights or group_size not in (None, stored.group_size):
        g = f", group_size {stored.group_size}" if stored.group_size else ""
        raise CheckpointError(f"{directory}: the checkpoint is already quantized ({stored.weights}{g}); quantize="
                              f"{quantize!r}, group_size={group_size!r} asks for another format, and re-quantizing "
                              f"quantized weights would compound the rounding: load it without quantize=, or "
                              f"quantize its float checkpoint")
    return None


def from_pretrained(path, cls, dtype: torch.dtype | str | None = None, device=None, *,
                    quantize: str | None = None, group_size: int | None = None, check_finite: bool = True,
                    activations: str | None = None):
    """Load a SambaY checkpoint directory (or hub id) into ``cls(config, dtype=...)`` (a SambaY causal LM class).
    dtype None = the checkpoint's ``torch_dtype``.

    quantize: "int8" or "int4" (with group_size, default 128): quantize the linears while loading (sambay.quant);
    the dense copy of each is dropped as soon as it is quantized. A checkpoint saved quantized loads quantized
    without it (asking for its own format is accepted; another one is an error).
    activations: None, or "int8" for 8-bit activations before the quantized linears (sambay.quant); with a
    quantized checkpoint, "int8" switches it on (None keeps what config.json says).
    check_finite: refuse weights with NaN/inf (every float tensor, after its dtype cast; quantization scales and
    minima too), listing them by name. Costs one sum per tensor: ~0.1-0.25 s/GB on a CPU core (see README), below
    the cost of reading the file."""
    device = _resolve_device(device)
    directory = resolve_checkpoint(path)
    if probe_path(directory / ckpt.CONFIG_FILE, "the checkpoint's config", "file") is None:
        leftovers = sorted(p.name for p in directory.glob(f".*{ckpt.TMP_SUFFIX}"))
        if leftovers:
            raise CheckpointError(f"{directory}: no {ckpt.CONFIG_FILE}, and temporary files of an interrupted "
                                  f"save_pretrained are there ({', '.join(leftovers[:5])}); the save did not complete "
                                  f"and the directory holds no consistent checkpoint: save it again")
    config = SambaYConfig.from_pretrained(directory)
    dtype = _resolve_dtype(dtype, config)
    if activations is not None:
        quant.check_activations(activations)
    quantizing = _resolve_quantize(quantize, group_size, config.quantization_config, directory, activations)
    if activations is not None and quantizing is None and config.quantization_config is not None:
        config = dataclasses.replace(config, quantization_config=dataclasses.replace(
            config.quantization_config, activations=activations))
    files = ckpt.checkpoint_files(directory)
    with torch.device("meta"), _NoInit():
        model = cls(config, dtype=dtype)  # with QuantLinears if config.json says the checkpoint is quantized
    exact = {n: ckpt.CODES[b.dtype] for n, b in model.named_buffers()}
    headers = [ckpt.read_header(p, exact) for p in files]
    ckpt.check_duplicates(files, headers)
    ckpt.check_index(directory, files, headers)
    _check_keys(model, headers, files)
    quantized_now: set[str] = set()  # modules whose dense weight is quantized as it is read
    if quantizing is not None:
        qc = quant.plan(model, *quantizing)
        quant.convert(model, qc)  # empty QuantLinears on meta
        quantized_now = set(qc.modules)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    embed, stored_head, nonfinite = "model.embed_tokens.weight", None, []
    tied = config.tie_word_embeddings
    # The dense weights to quantize as they are read (a stored copy of the tied head is only compared, below).
    dense_in = {f"{m}.weight" for m in quantized_now} - ({"lm_head.weight"} if tied else set())
    scratch = _Scratch({n: i for h, _ in headers for n, i in h.items() if ckpt.RENAMES.get(n, n) in dense_in}, dtype,
                       device)
    for name, tensor, file in ckpt.iter_checkpoint(files, headers, scratch.read_buffer):
        module_name, _, attr = name.rpartition(".")
        if name in dense_in:  # in the model dtype, then quantized: what model.quantize() would see
            t = scratch.to_model(tensor)
        elif name in buffers:  # exactly as stored (read_header checked the dtype)
            t = tensor.to(device=device)
        else:
            target = params.get(name, params[embed] if name == "lm_head.weight" else None)
            t = tensor.to(device=device, dtype=_target_dtype(name, target, dtype))
        if check_finite and not ckpt.is_finite(t):
            nonfinite.append(_nonfinite_problem(name, tensor, t, file))
        if name in buffers and t.dtype == torch.int8 and t.numel() and int(t.min()) < -127:
            # the int8 format is symmetric, [-127, 127]; the integer kernels negate weights and rely on it
            raise CheckpointError(f"{file}: {name}: int8 weights must lie in [-127, 127] (sambay's int8 format), "
                                  f"found {int(t.min())}; the checkpoint was not written by sambay's quantizer")
        if name in dense_in:
            model.get_submodule(module_name).load_weight(t)
            del tensor, t
            continue
        if name == embed and tied and "lm_head" in quantized_now:
            model.lm_head.load_weight(t)  # the tied head's own quantized copy; the embedding stays exact
        if name not in params and name not in buffers:  # the tied head's stored copy: compared once both are read
            stored_head = (t, file)
            continue
        module = model.get_submodule(module_name)
        if name in buffers:
            setattr(module, attr, t)
        else:
            setattr(module, attr, torch.nn.Parameter(t, requires_grad=params[name].requires_grad))
        del tensor, t, module
    if nonfinite:
        raise CheckpointError(f"{directory}: {len(nonfinite)} tensor(s) hold non-finite values (a diverged or "
                              f"corrupt checkpoint; pass check_finite=False to load it anyway):\n"
                              + "\n".join(nonfinite[:ckpt.MAX_LISTED]) + ckpt.more(nonfinite))
    if stored_head is not None:
        head, file = stored_head
        emb = model.get_submodule("model.embed_tokens").weight
        if not torch.equal(head, emb):
            diff = float((head - emb.detach()).abs().max())  # error path only: one temporary
            raise CheckpointError(f"{file}: lm_head.weight differs from model.embed_tokens.weight (max |difference| "
                                  f"{diff:.4g}), but config.json has tie_word_embeddings=true, which would replace the "
                                  f"head by the embedding; expected an identical copy or none (if the head is untied, "
                                  f"set tie_word_embeddings to false)")
        del stored_head, head
    model.tie_weights()
    return model.eval()



# ---- saving ----------------------------------------------------------------------------------------
def save_pretrained(model, directory, max_shard_size: int | str = "5GB", *, check_finite: bool = True,
                    files: dict[str, str] | None = None) -> None:
    """Write config.json and the weights (sharded above ``max_shard_size``) in the released layout, and ``files``
    (name -> text), atomically (:func:`sambay.checkpoint.write`): until the new checkpoint is complete on disk the
    old one stays intact and loadable.

    check_finite: refuse to write NaN/inf weights (the checkpoint would be refused on load), listing them."""
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "lm_head") and hasattr(model, "sambay_config")):
        raise TypeError(f"model: expected a SambaYForCausalLM, got {type(model).__name__}")
    ckpt.parse_size(max_shard_size)  # a bad size is refused before anything is looked at
    directory = ckpt.check_save_directory(directory)
    # Parameters (the tied head once) and the quantized buffers (qweight/scales/mins, as they are).
    state = [*model.named_parameters(), *model.named_buffers()]
    meta = [n for n, p in state if p.is_meta]
    if meta:
        raise ValueError(f"model: {len(meta)} parameter(s) are on the meta device (no data to save), e.g. {meta[0]}")
    tensors = {n: p.detach().contiguous().cpu() for n, p in state}
    if check_finite:
        bad = [f"  {n}: {nan} NaN and {inf} inf value(s)" for n, t in tensors.items() if not ckpt.is_finite(t)
               for nan, inf in [ckpt.nonfinite_counts(t)]]
        if bad:
            raise ValueError(f"model: refusing to save non-finite weights ({len(bad)} tensor(s)); nothing was "
                             f"written (pass check_finite=False to save them anyway):\n"
                             + "\n".join(bad[:ckpt.MAX_LISTED]) + ckpt.more(bad))
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    qc = quant.describe(model)  # what the modules hold, so that the file always loads as saved
    cfg.pop("quantization_config", None)
    if qc is not None:
        cfg["quantization_config"] = qc.to_dict()
    try:
        cfg_text = json.dumps(cfg, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"model.config: cannot be written as config.json ({e})") from None
    ckpt.write(directory, tensors, cfg_text, max_shard_size, files)
