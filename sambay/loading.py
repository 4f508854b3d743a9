"""Strict checkpoint loading and saving in the released layout (``config.json`` + ``model.safetensors``
or shards with ``model.safetensors.index.json``), with the official key names and no renames.

Loading builds the model on the meta device and assigns each tensor as it is read, so peak memory
stays close to the checkpoint's size: tensors are read with plain file reads straight into their
final buffers (no memory map whose pages would count a second time), converted one at a time only
when a dtype change is asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from sambay.config import SambaYConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The one rename table: checkpoint key -> parameter name. Empty, because module paths mirror the keys.
RENAMES: dict[str, str] = {}
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or a file that is not a valid safetensors file."""


# ---- reading ------------------------------------------------------------------------------------
def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Parse a safetensors header. Returns ({name: {dtype, shape, data_offsets}}, data start offset).
    Raises CheckpointError for a truncated or corrupt file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (header length {n}, "
                                  f"file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated: the header describes {data_start + end} bytes, the file has "
                              f"{size}")
    for name, info in header.items():
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    return header, data_start


def _read_tensor(f, info: dict, data_start: int) -> torch.Tensor:
    shape, (a, b) = info["shape"], info["data_offsets"]
    t = torch.empty(shape, dtype=_DTYPES[info["dtype"]])
    if t.numel() * t.element_size() != b - a:
        raise CheckpointError(f"{f.name}: corrupt entry: shape {shape} of {info['dtype']} needs "
                              f"{t.numel() * t.element_size()} bytes, the header gives {b - a}")
    f.seek(data_start + a)
    if b > a:
        got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        if got != b - a:
            raise CheckpointError(f"{f.name}: truncated while reading tensor data")
    return t


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the shards of the index)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: the index names shard(s) that do not exist: {missing}")
    return files


def iter_checkpoint(files: list[Path], headers: list[tuple[dict, int]]) -> Iterator[tuple[str, torch.Tensor]]:
    for path, (header, start) in zip(files, headers):
        with open(path, "rb") as f:
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                yield RENAMES.get(name, name), _read_tensor(f, info, start)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A local directory, or a Hugging Face hub id resolved through huggingface_hub's cache."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"{path} is a file; expected a checkpoint directory (config.json + safetensors)")
    name = os.fspath(path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"no such checkpoint directory: {name}")
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
        raise FileNotFoundError(f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                                f"Without network, download the snapshot elsewhere (huggingface-cli download {name}) "
                                f"and pass its directory.") from None


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
            continue  # a stored copy of the tied head is accepted and ignored
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


def from_pretrained(path, dtype: torch.dtype | None = None, device=None, cls=None):
    """Load a SambaY checkpoint directory (or hub id). dtype None = the checkpoint's ``torch_dtype``."""
    from sambay.model import SambaYForCausalLM

    cls = cls or SambaYForCausalLM
    directory = resolve_checkpoint(path)
    config = SambaYConfig.from_pretrained(directory)
    if dtype is None:
        dtype = getattr(torch, config.torch_dtype) if config.torch_dtype else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    files = checkpoint_files(directory)
    headers = [read_header(p) for p in files]
    with torch.device("meta"), _skip_init():
        model = cls(config, dtype=dtype)
    _check_keys(model, headers, files)
    device = torch.device(device) if device is not None else torch.device("cpu")
    params = dict(model.named_parameters())
    for name, tensor in iter_checkpoint(files, headers):
        if name not in params:
            continue  # the tied head's stored copy
        target = params[name]
        t = tensor.to(device=device, dtype=_target_dtype(name, target, dtype))
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(t, requires_grad=target.requires_grad))
        del tensor, t
    model.tie_weights()
    return model.eval()


# ---- saving -------------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    s = size.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * units[u])
    return int(s)


def save_pretrained(model, directory, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and the weights (sharded above ``max_shard_size``) in the released layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}  # tied head once
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += nbytes
    for stale in [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(directory / INDEX_FILE, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
