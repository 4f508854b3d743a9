"""Strict checkpoint loading and saving in the released layout (``config.json`` + ``model.safetensors``
or shards with ``model.safetensors.index.json``), with the official key names and no renames.

Loading builds the model on the meta device and assigns each tensor as it is read, so peak memory
stays close to the checkpoint's size: every header is validated by the official ``safetensors``
parser (offsets contiguous, non-overlapping and covering the file; shapes matching byte counts;
known dtypes), then tensors are read with plain file reads straight into their final buffers (no
memory map, whose touched pages would count a second time while the file is open), converted one at
a time only when a dtype change is asked for. Each loaded tensor is screened for NaN/inf.

Quantized weights (:mod:`sambay.quant`): a checkpoint whose config.json has sambay's ``quantization_config``
builds QuantLinear modules and reads their buffers (``<module>.qweight``, ``.scales``, ``.mins``) exactly as
stored (int8/uint8/bf16/fp32, no cast). ``quantize=`` quantizes a float checkpoint while loading: each dense weight
of a quantized module is quantized as soon as it is read and then dropped, so the peak stays near the quantized
model plus one dense tensor.

Saving is atomic per checkpoint: every file is written under a temporary name and fsynced first; the
commit then removes ``config.json``, renames the weights into place and writes ``config.json`` last.
A save that dies before the commit leaves the old checkpoint untouched; one that dies inside the
commit leaves a directory without ``config.json``, which loading refuses with a message that says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sambay import quant
from sambay.config import DTYPE_NAMES, SambaYConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# The one rename table: checkpoint key -> parameter name. Empty, because module paths mirror the keys.
RENAMES: dict[str, str] = {}
# Stored dtypes a float model can be loaded from: any float -> float cast is defined (narrowing casts are
# screened for overflow to inf afterwards). Integer, bool and 8-bit/4-bit float tensors are not weights of this
# model and are refused by name, except the buffers of sambay's quantized format, read exactly as the model
# declares them (_DTYPES, _CODES).
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPES = {**_FLOAT_DTYPES, "I8": torch.int8, "U8": torch.uint8}
_CODES = {v: k for k, v in _DTYPES.items()}
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_TMP_SUFFIX = ".sambay-tmp"  # temporary files of a save in progress: ".<final name>.sambay-tmp"
_MAX_LISTED = 20  # problems listed in one error message


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or a file that is not a valid safetensors file."""


# ---- reading ------------------------------------------------------------------------------------
def read_header(path: str | os.PathLike, exact: dict[str, str] | None = None) -> tuple[dict, int]:
    """Parse and validate a safetensors header. Returns ({name: {dtype, shape, data_offsets}}, data start).

    The official parser (``safetensors.safe_open``) is the authority on validity; the header JSON is read
    here only for the byte offsets, which that parser has just checked. Raises CheckpointError naming the
    file (and tensor) for a truncated or corrupt file, or a tensor whose dtype is not a float dtype, or for a
    name in ``exact`` (a quantized buffer: name -> safetensors dtype code), not exactly that dtype."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes; expected an 8-byte header "
                                  f"length, the JSON header and the tensor data)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (header length {n}, "
                                  f"file size {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (expected a JSON object, found "
                              f"{type(header).__name__})")
    header.pop("__metadata__", None)
    ends = [info["data_offsets"][1] for info in header.values()
            if isinstance(info, dict) and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
            and isinstance(info["data_offsets"][1], int)]
    data_start = 8 + n
    if data_start + max(ends, default=0) > size:
        raise CheckpointError(f"{path}: truncated: the header describes {data_start + max(ends)} bytes, the file "
                              f"has {size}")
    try:
        with safe_open(path, framework="pt") as st:
            official = {k: (st.get_slice(k).get_dtype(), list(st.get_slice(k).get_shape())) for k in st.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    if official.keys() != header.keys():  # safe_open refuses duplicate keys; this is an internal invariant
        raise CheckpointError(f"{path}: the header's keys are ambiguous (duplicated names?)")
    for name, (dtype, _) in sorted(official.items()):
        want = (exact or {}).get(name)
        if want is not None and dtype != want:
            raise CheckpointError(f"{path}: tensor {name} is stored as {dtype}; expected {want} (a buffer of "
                                  f"sambay's quantized format, read as stored)")
        if want is None and dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} is stored as {dtype}; expected a float dtype "
                                  f"({', '.join(_FLOAT_DTYPES)}) that casts to the model's (integer, bool and "
                                  f"quantized tensors are not weights of this model)")
    return header, data_start


def _read_tensor(f, info: dict, data_start: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor ``info`` describes, read into ``out`` (a tensor of its shape and dtype) or a new buffer."""
    shape, (a, b) = info["shape"], info["data_offsets"]
    t = torch.empty(shape, dtype=_DTYPES[info["dtype"]]) if out is None else out
    if t.numel() * t.element_size() != b - a:  # validated by safetensors; kept as a guard for the read below
        raise CheckpointError(f"{f.name}: corrupt entry: shape {shape} of {info['dtype']} needs "
                              f"{t.numel() * t.element_size()} bytes, the header gives {b - a}")
    f.seek(data_start + a)
    if b > a:
        got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        if got != b - a:
            raise CheckpointError(f"{f.name}: truncated while reading tensor data")
    return t


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map of a shard index, checked: a JSON object whose ``weight_map`` maps every key to the
    plain file name of a shard in the same directory."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (not JSON: {e})") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        found = f"keys {sorted(data)}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise CheckpointError(f"{index}: not a valid safetensors index (expected an object with a 'weight_map', "
                              f"found {found})")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map: expected a non-empty object of tensor name -> shard file, "
                              f"found {weight_map!r:.80}")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
            raise CheckpointError(f"{index}: weight_map[{key!r}]: expected the file name of a shard in the same "
                                  f"directory, found {name!r}")
    return weight_map


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the shards of the index)."""
    index, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index.is_file() and single.is_file():
        raise CheckpointError(f"{directory}: holds both {SINGLE_FILE} and {INDEX_FILE}; expected one layout "
                              f"(one of them is stale: remove it)")
    if index.is_file():
        files = [directory / name for name in dict.fromkeys(_read_index(index).values())]
    elif single.is_file():
        files = [single]
    else:
        raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{index}: the index names shard(s) that do not exist in {directory}: {missing}")
    return files


def _check_duplicates(files: list[Path], headers: list[tuple[dict, int]]) -> None:
    """A key stored in two shards is ambiguous (which copy is the weight?): refused, not last-one-wins."""
    seen: dict[str, Path] = {}
    problems = []
    for path, (header, _) in zip(files, headers):
        for name in sorted(header):
            if name in seen:
                problems.append(f"{name} is stored in both {seen[name].name} and {path.name}")
            seen.setdefault(name, path)
    if problems:
        raise CheckpointError(f"{path.parent}: {len(problems)} tensor(s) stored in more than one shard; expected each "
                              f"in exactly one:\n  " + "\n  ".join(problems[:_MAX_LISTED]) + _more(problems))


def _check_index(directory: Path, files: list[Path], headers: list[tuple[dict, int]]) -> None:
    """Every key of the index is in the shard it names, and every stored key is in the index."""
    index = directory / INDEX_FILE
    if not index.is_file():
        return
    weight_map = _read_index(index)
    problems = []
    for path, (header, _) in zip(files, headers):
        for name in sorted(header):
            if weight_map.get(name) != path.name:
                where = f"names {weight_map[name]}" if name in weight_map else "does not list it"
                problems.append(f"{name} is stored in {path.name}, but the index {where}")
        for name in sorted(k for k, v in weight_map.items() if v == path.name and k not in header):
            problems.append(f"{name}: the index names {path.name}, which does not hold it")
    if problems:
        raise CheckpointError(f"{index}: weight_map does not match the shards ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems[:_MAX_LISTED]) + _more(problems))


def iter_checkpoint(files: list[Path], headers: list[tuple[dict, int]],
                    buffer_for=None) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(parameter name, tensor as stored, file) in file order, each read into its own buffer, or into
    ``buffer_for(name)`` when that gives one (a reused buffer: the caller is done with it before the next read)."""
    for path, (header, start) in zip(files, headers):
        with open(path, "rb") as f:
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                name = RENAMES.get(name, name)
                yield name, _read_tensor(f, info, start, buffer_for and buffer_for(name)), path


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
        stored = {n: _DTYPES[i["dtype"]] for n, i in infos.items()}
        self.raw = torch.empty(max((numel[n] * stored[n].itemsize for n in infos), default=0), dtype=torch.uint8)
        cast = [numel[n] * dtype.itemsize for n in infos if stored[n] != dtype and device.type == "cpu"]
        self.cast = torch.empty(max(cast, default=0), dtype=torch.uint8)

    def read_buffer(self, name: str) -> torch.Tensor | None:
        info = self.infos.get(name)
        return None if info is None else _view(self.raw, info["shape"], _DTYPES[info["dtype"]])

    def to_model(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == self.dtype or self.device.type != "cpu":
            return t.to(device=self.device, dtype=self.dtype)
        return _view(self.cast, t.shape, self.dtype).copy_(t)  # the same rounding as t.to(dtype)


def _looks_like_hub_id(name: str) -> bool:
    """'org/name' with the characters the hub allows, whose first part is not a local directory."""
    parts = name.split("/")
    return (len(parts) == 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in parts)
            and not name.endswith(".") and not Path(parts[0]).exists())


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A local directory, or a Hugging Face hub id resolved through huggingface_hub's cache."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a checkpoint directory (str or os.PathLike) or a hub id, got "
                        f"{type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{path} is a file; expected a checkpoint directory (config.json + safetensors)")
    name = os.fspath(path)
    if not _looks_like_hub_id(name):
        parent = next((q for q in p.absolute().parents if q.is_dir()), None)
        raise FileNotFoundError(f"no such checkpoint directory: {name} (the nearest existing directory is {parent})")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name!r} is not a local directory, and resolving it as a Hugging Face hub id needs "
                                f"huggingface_hub (pip install 'sambay[hf]'). Or download the snapshot yourself and "
                                f"pass its directory.") from None
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja"]))
    except Exception as e:  # offline, unknown repo, no access: say what to do instead
        raise FileNotFoundError(f"{name!r} is not a local directory, and fetching it from the Hugging Face hub failed "
                                f"({type(e).__name__}: {e}). Without network, download the snapshot elsewhere "
                                f"(huggingface-cli download {name}) and pass its directory.") from None


def _check_keys(model: torch.nn.Module, headers: list[tuple[dict, int]], files: list[Path]) -> None:
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected.update({n: tuple(b.shape) for n, b in model.named_buffers()})
    found: dict[str, tuple[tuple, Path]] = {}
    for path, (header, _) in zip(files, headers):
        for name, info in header.items():
            found[RENAMES.get(name, name)] = (tuple(info["shape"]), path)
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


@contextlib.contextmanager
def _skip_init():
    """Make torch.nn.init's fills no-ops while building on the meta device: every value is overwritten by
    the checkpoint, and running the initialisers on meta tensors imports torch._dynamo (~150 MiB of RSS)."""
    names = ("uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


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


def _nonfinite_counts(t: torch.Tensor, chunk: int = 1 << 22) -> tuple[int, int]:
    """(NaN count, inf count) of ``t``, in chunks so that the temporary masks stay small."""
    flat, nan, inf = t.detach().reshape(-1), 0, 0
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    return nan, inf


def _is_finite(t: torch.Tensor) -> bool:
    """True when every value is finite. The screen is a plain sum, ~30x cheaper than ``isfinite(t).all()``
    (no mask to allocate): a NaN or inf anywhere makes the sum NaN or inf. A sum that overflows although
    every value is finite is a false alarm, settled by counting exactly."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if math.isfinite(float(t.detach().sum())):
        return True
    return _nonfinite_counts(t) == (0, 0)


def _nonfinite_problem(name: str, stored: torch.Tensor, loaded: torch.Tensor, path: Path) -> str:
    nan, inf = _nonfinite_counts(loaded)
    where = f"{name} (in {path.name})"
    if stored.dtype != loaded.dtype and _nonfinite_counts(stored) == (0, 0):
        return (f"  {where}: {inf} value(s) became inf when cast from {stored.dtype} to {loaded.dtype} (beyond "
                f"{loaded.dtype}'s range, max |x| = {float(stored.abs().max()):.4g})")
    return f"  {where}: {nan} NaN and {inf} inf value(s)"


def _more(problems: list) -> str:
    return f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""


def _resolve_quantize(quantize, group_size, stored: quant.QuantizationConfig | None, directory: Path):
    """(weights, group_size) to quantize while loading, or None (a float load, or a checkpoint already in the asked
    format). Quantizing quantized weights again is refused: the roundings would compound."""
    if quantize is None:
        if group_size is not None:
            raise ValueError(f"group_size: only with quantize='int4', got group_size={group_size!r} without quantize")
        return None
    if stored is None:
        return quant.resolve(quantize, group_size)
    if quantize != stored.weights or group_size not in (None, stored.group_size):
        g = f", group_size {stored.group_size}" if stored.group_size else ""
        raise CheckpointError(f"{directory}: the checkpoint is already quantized ({stored.weights}{g}); quantize="
                              f"{quantize!r}, group_size={group_size!r} asks for another format, and re-quantizing "
                              f"quantized weights would compound the rounding: load it without quantize=, or "
                              f"quantize its float checkpoint")
    return None


def from_pretrained(path, dtype: torch.dtype | str | None = None, device=None, cls=None, *,
                    quantize: str | None = None, group_size: int | None = None, check_finite: bool = True):
    """Load a SambaY checkpoint directory (or hub id). dtype None = the checkpoint's ``torch_dtype``.

    quantize: "int8" or "int4" (with group_size, default 128): quantize the linears while loading (sambay.quant);
    the dense copy of each is dropped as soon as it is quantized. A checkpoint saved quantized loads quantized
    without it (asking for its own format is accepted; another one is an error).
    check_finite: refuse weights with NaN/inf (every float tensor, after its dtype cast; quantization scales and
    minima too), listing them by name. Costs one sum per tensor: ~0.1-0.25 s/GB on a CPU core (see README), below
    the cost of reading the file."""
    from sambay.model import SambaYForCausalLM

    cls = cls or SambaYForCausalLM
    device = _resolve_device(device)
    directory = resolve_checkpoint(path)
    if not (directory / CONFIG_FILE).is_file():
        leftovers = sorted(p.name for p in directory.glob(f".*{_TMP_SUFFIX}"))
        if leftovers:
            raise CheckpointError(f"{directory}: no {CONFIG_FILE}, and temporary files of an interrupted "
                                  f"save_pretrained are there ({', '.join(leftovers[:5])}); the save did not complete "
                                  f"and the directory holds no consistent checkpoint: save it again")
    config = SambaYConfig.from_pretrained(directory)
    dtype = _resolve_dtype(dtype, config)
    quantizing = _resolve_quantize(quantize, group_size, config.quantization_config, directory)
    files = checkpoint_files(directory)
    with torch.device("meta"), _skip_init():
        model = cls(config, dtype=dtype)  # with QuantLinears if config.json says the checkpoint is quantized
    exact = {n: _CODES[b.dtype] for n, b in model.named_buffers()}
    headers = [read_header(p, exact) for p in files]
    _check_duplicates(files, headers)
    _check_index(directory, files, headers)
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
    scratch = _Scratch({n: i for h, _ in headers for n, i in h.items() if RENAMES.get(n, n) in dense_in}, dtype,
                       device)
    for name, tensor, file in iter_checkpoint(files, headers, scratch.read_buffer):
        module_name, _, attr = name.rpartition(".")
        if name in dense_in:  # in the model dtype, then quantized: what model.quantize() would see
            t = scratch.to_model(tensor)
        elif name in buffers:  # exactly as stored (read_header checked the dtype)
            t = tensor.to(device=device)
        else:
            target = params.get(name, params[embed] if name == "lm_head.weight" else None)
            t = tensor.to(device=device, dtype=_target_dtype(name, target, dtype))
        if check_finite and not _is_finite(t):
            nonfinite.append(_nonfinite_problem(name, tensor, t, file))
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
                              + "\n".join(nonfinite[:_MAX_LISTED]) + _more(nonfinite))
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


# ---- saving -------------------------------------------------------------------------------------
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def _parse_size(size: int | str) -> int:
    """max_shard_size: bytes as an int, or a string such as "5GB", "500MB", "1.5GiB" (HF's units)."""
    expected = "a positive number of bytes, or a size such as '5GB', '500MB' or '2GiB'"
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"max_shard_size: expected {expected}, got {size!r} ({type(size).__name__})")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", size)
        unit = m.group(2).upper() if m else ""
        if m is None or (unit and unit not in _UNITS):
            raise ValueError(f"max_shard_size: expected {expected}, got {size!r}")
        n = int(float(m.group(1)) * _UNITS.get(unit, 1))
    if n < 1:
        raise ValueError(f"max_shard_size: expected {expected}, got {size!r}")
    return n


def _plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive tensors, a new shard whenever the next would go over ``limit`` (a bigger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += nbytes
    return shards


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable (POSIX; Windows cannot open a directory)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(final: str) -> str:
    return f".{final}{_TMP_SUFFIX}"


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _old_files(directory: Path) -> set[str]:
    """Weight files of the checkpoint now in ``directory``: the single file, the index and its shards, and
    anything named like a shard (left by an earlier save)."""
    names = {p.name for p in directory.iterdir() if _SHARD_PATTERN.fullmatch(p.name)}
    names |= {n for n in (SINGLE_FILE, INDEX_FILE) if (directory / n).is_file()}
    if (directory / INDEX_FILE).is_file():
        with contextlib.suppress(CheckpointError, OSError):
            names |= {n for n in _read_index(directory / INDEX_FILE).values() if n.endswith(".safetensors")}
    return names


def save_pretrained(model, directory, max_shard_size: int | str = "5GB", *, check_finite: bool = True) -> None:
    """Write config.json and the weights (sharded above ``max_shard_size``) in the released layout, atomically:
    until the new checkpoint is complete on disk the old one stays intact and loadable (see the module doc).

    check_finite: refuse to write NaN/inf weights (the checkpoint would be refused on load), listing them."""
    from sambay.model import SambaYForCausalLM

    if not isinstance(model, SambaYForCausalLM):
        raise TypeError(f"model: expected a SambaYForCausalLM, got {type(model).__name__}")
    limit = _parse_size(max_shard_size)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path (str or os.PathLike), got {type(directory).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"directory: {directory} exists and is not a directory; expected a checkpoint "
                                 f"directory (or a path to create)")
    # Parameters (the tied head once) and the quantized buffers (qweight/scales/mins, as they are).
    state = [*model.named_parameters(), *model.named_buffers()]
    meta = [n for n, p in state if p.is_meta]
    if meta:
        raise ValueError(f"model: {len(meta)} parameter(s) are on the meta device (no data to save), e.g. {meta[0]}")
    tensors = {n: p.detach().contiguous().cpu() for n, p in state}
    if check_finite:
        bad = [f"  {n}: {nan} NaN and {inf} inf value(s)" for n, t in tensors.items() if not _is_finite(t)
               for nan, inf in [_nonfinite_counts(t)]]
        if bad:
            raise ValueError(f"model: refusing to save non-finite weights ({len(bad)} tensor(s)); nothing was "
                             f"written (pass check_finite=False to save them anyway):\n" + "\n".join(bad[:_MAX_LISTED])
                             + _more(bad))
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
    shards = _plan_shards(tensors, limit)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])

    directory.mkdir(parents=True, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"directory: {directory} is not writable")
    for leftover in directory.glob(f".*{_TMP_SUFFIX}"):  # from an interrupted earlier save
        leftover.unlink()
    old = _old_files(directory)
    staged: list[tuple[Path, Path]] = []  # (temporary, final), weights and index first, config.json last
    try:
        for name, shard in zip(names, shards):
            tmp = directory / _tmp_name(name)
            staged.append((tmp, directory / name))
            save_file(shard, tmp, metadata={"format": "pt"})
            _fsync_file(tmp)
        if len(shards) > 1:
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            tmp = directory / _tmp_name(INDEX_FILE)
            staged.append((tmp, directory / INDEX_FILE))
            _write_text(tmp, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        tmp = directory / _tmp_name(CONFIG_FILE)
        staged.append((tmp, directory / CONFIG_FILE))
        _write_text(tmp, cfg_text)
    except BaseException:  # a full disk, a bad tensor, Ctrl-C: the old checkpoint was not touched
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    # Commit. From here until config.json is back, the directory has none, so a reader refuses it loudly
    # (never pairs new weights with the old config, or old shards with a new index).
    (directory / CONFIG_FILE).unlink(missing_ok=True)
    _fsync_dir(directory)
    new = {final.name for _, final in staged}
    for stale in ({SINGLE_FILE, INDEX_FILE} & old) - new:  # the other layout's entry file would win or conflict
        (directory / stale).unlink()
    for tmp, final in staged[:-1]:
        os.replace(tmp, final)
    _fsync_dir(directory)
    os.replace(*staged[-1])  # config.json: the new checkpoint is complete
    _fsync_dir(directory)
    for stale in old - new - {SINGLE_FILE, INDEX_FILE}:  # shards of the old set that the new one does not use
        (directory / stale).unlink(missing_ok=True)
