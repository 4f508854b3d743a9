"""The checkpoint files, in the released layout (``config.json`` + ``model.safetensors``, or shards with
``model.safetensors.index.json``), with the official key names and no renames: where a checkpoint is (a directory
or a hub id), what its files hold (every header field validated), reading tensors, and the one atomic writer.
The model side (building, strict keys, dtypes, quantizing while reading) is :mod:`sambay.loading`.

Headers: every field of every header is checked here first (each error naming the file, the tensor and the field:
dtype codes, shapes matching byte counts, offsets contiguous, non-overlapping and covering the file), then by the
official ``safetensors`` parser; tensors are read with plain file reads straight into their final buffers (no
memory map, whose touched pages would count a second time while the file is open).

Writing is atomic per checkpoint: every file is written under a temporary name and fsynced first; the commit then
removes ``config.json``, renames the other files into place and writes ``config.json`` last. A save that dies
before the commit leaves the old checkpoint untouched; one that dies inside the commit leaves a directory without
``config.json``, which loading refuses with a message that says so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# The one rename table: checkpoint key -> parameter name. Empty, because module paths mirror the keys.
RENAMES: dict[str, str] = {}
# Stored dtypes a float model can be loaded from: any float -> float cast is defined (narrowing casts are
# screened for overflow to inf afterwards). Integer, bool and 8-bit/4-bit float tensors are not weights of this
# model and are refused by name, except the buffers of sambay's quantized format, read exactly as the model
# declares them (DTYPES, CODES).
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPES = {**FLOAT_DTYPES, "I8": torch.int8, "U8": torch.uint8}
CODES = {v: k for k, v in DTYPES.items()}
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
TMP_SUFFIX = ".sambay-tmp"  # temporary files of a save in progress: ".<final name>.sambay-tmp"
MAX_LISTED = 20  # problems listed in one error message


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or a file that is not a valid safetensors file."""


# ---- paths --------------------------------------------------------------------------------------
def _os_error(cls: type[OSError], code: int, message: str) -> OSError:
    """``cls(message)`` carrying ``errno`` ``code``, its message free of the "[Errno n]" prefix."""
    e = cls(message)
    e.errno = code
    return e


def _unreadable(path, what: str, e: OSError) -> OSError:
    """The OSError ``e`` (from os.stat of ``path``) restated with the path and what is wrong there."""
    if e.errno == errno.ELOOP:
        why = "is a symbolic link loop (too many levels of symbolic links)"
    elif e.errno == errno.ENOTDIR:
        why = "cannot be reached: a component of the path is a file, not a directory"
    elif isinstance(e, PermissionError):
        why = "cannot be read: permission denied (to search a directory above it)"
    else:
        why = f"cannot be read ({e.strerror or e})"
    return _os_error(type(e), e.errno, f"{what} {os.fspath(path)} {why}")


def probe_path(path, what: str, kind: str) -> os.stat_result | None:
    """``os.stat(path)`` when ``path`` is a ``kind`` ("file": a regular file; "directory") this process can read;
    None when nothing is there. Anything else there (a symlink loop, a link to nothing, a directory where a file
    is expected or the reverse, a FIFO, no permission) is an OSError naming the path (``what`` says which path it
    is) and what is wrong, never reported as missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise _os_error(FileNotFoundError, errno.ENOENT, f"{what} {os.fspath(path)} is a symbolic link to "
                                                           f"{os.readlink(path)}, which does not exist") from None
        return None
    except OSError as e:
        raise _unreadable(path, what, e) from None
    found = stat.filemode(st.st_mode)
    if kind == "directory" and not stat.S_ISDIR(st.st_mode):
        raise _os_error(NotADirectoryError, errno.ENOTDIR, f"{what} {os.fspath(path)} is not a directory (mode "
                                                          f"{found}); expected a directory")
    if kind == "file" and stat.S_ISDIR(st.st_mode):
        raise _os_error(IsADirectoryError, errno.EISDIR, f"{what} {os.fspath(path)} is a directory; expected a file")
    if kind == "file" and not stat.S_ISREG(st.st_mode):  # a FIFO or a device: reading it could block forever
        raise _os_error(OSError, errno.EINVAL, f"{what} {os.fspath(path)} is not a regular file (mode {found}); "
                                              f"expected a file")
    access = os.R_OK | (os.X_OK if kind == "directory" else 0)
    if not os.access(path, access, effective_ids=os.access in os.supports_effective_ids):
        need = "read and search" if kind == "directory" else "read"
        raise _os_error(PermissionError, errno.EACCES, f"{what} {os.fspath(path)} cannot be read: permission denied "
                                                      f"(mode {found}, owner uid {st.st_uid}; expected {need} "
                                                      f"permission)")
    return st


def _stat_file(path, what: str) -> os.stat_result:
    """probe_path for a file that must exist."""
    st = probe_path(path, what, "file")
    if st is None:
        raise _os_error(FileNotFoundError, errno.ENOENT, f"{what} {os.fspath(path)} does not exist")
    return st


# ---- reading ------------------------------------------------------------------------------------
# Every dtype code of the safetensors format (0.8) and its bits per element: the header's byte spans are checked
# against them, so a code sambay does not load is named as such rather than reported as a bad span.
_FORMAT_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
                "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
                "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a name given twice would be last-one-wins in json, ambiguous in the file."""
    d = dict(pairs)
    if len(d) != len(pairs):
        twice = sorted({k for k, _ in pairs if sum(1 for j, _ in pairs if j == k) > 1})
        raise CheckpointError(f"the names {twice} appear more than once in one JSON object; expected each once")
    return d


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path, name: str, info, exact: dict[str, str] | None) -> tuple[int, int]:
    """One tensor's header entry, field by field; returns its (begin, end) byte offsets. Raises CheckpointError
    naming the file, the tensor, the field, what was expected and what was found."""
    where = f"{path}: tensor {name}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: expected an object with dtype, shape and data_offsets, found {info!r:.80}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {missing}; expected dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _FORMAT_BITS:
        raise CheckpointError(f"{where}: dtype {dtype!r} is not a safetensors dtype; expected one of "
                              f"{', '.join(_FORMAT_BITS)}")
    want = (exact or {}).get(name)
    if want is not None and dtype != want:
        raise CheckpointError(f"{where} is stored as {dtype}; expected {want} (a buffer of sambay's quantized "
                              f"format, read as stored)")
    if want is None and dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where} is stored as {dtype}; expected a float dtype ({', '.join(FLOAT_DTYPES)}) "
                              f"that casts to the model's (integer, bool and 8-bit/4-bit float tensors are not "
                              f"weights of this model)")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise CheckpointError(f"{where}: shape {shape!r:.80}: expected a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise CheckpointError(f"{where}: data_offsets {offsets!r:.80}: expected [begin, end], two integers with "
                              f"0 <= begin <= end (bytes from the start of the data)")
    need_bits = math.prod(shape) * _FORMAT_BITS[dtype]
    if need_bits != 8 * (offsets[1] - offsets[0]):
        need = need_bits // 8 if need_bits % 8 == 0 else need_bits / 8
        raise CheckpointError(f"{where}: shape {shape} of {dtype} needs {need} bytes, but data_offsets {offsets} "
                              f"span {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def _check_layout(path, spans: dict[str, tuple[int, int]], data_size: int, data_start: int) -> None:
    """The tensors' byte spans tile the data region exactly, as the format requires: in offset order, each begins
    where the previous ended, the first at 0, the last at the end of the file."""
    at, previous = 0, None
    for name, (a, b) in sorted(spans.items(), key=lambda kv: kv[1]):
        if a < at:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets [{a}, {b}] overlap tensor {previous} "
                                  f"(which ends at {at}); expected each tensor's bytes to start where the previous "
                                  f"one ended")
        if a > at:
            after = f"after tensor {previous}" if previous else "at the start of the data"
            raise CheckpointError(f"{path}: tensor {name}: data_offsets [{a}, {b}] leave bytes {at}..{a} {after} "
                                  f"unused; expected the tensors to follow one another without gaps")
        at, previous = b, name
    if at > data_size:
        raise CheckpointError(f"{path}: truncated: the header describes {data_start + at} bytes, the file has "
                              f"{data_start + data_size}")
    if at < data_size:
        raise CheckpointError(f"{path}: {data_size - at} byte(s) after the last tensor's data (the tensors end at "
                              f"{at}, the data region has {data_size}); expected the tensors to cover the file")


def read_header(path: str | os.PathLike, exact: dict[str, str] | None = None) -> tuple[dict, int]:
    """Parse and validate a safetensors header. Returns ({name: {dtype, shape, data_offsets}}, data start).

    Every field of the JSON header is checked here first, so that a malformed file is reported by file, tensor
    and field with what was expected and found: each dtype is a safetensors code that this model loads (a float,
    or for a name in ``exact`` (a quantized buffer: name -> dtype code) exactly that code), each shape a list of
    non-negative integers whose size in that dtype equals the byte span of its data_offsets, and the spans tile
    the data region. The official parser (``safetensors.safe_open``) then reads the header too and stays the
    authority: anything it still refuses is a CheckpointError quoting it."""
    size = _stat_file(path, "safetensors file").st_size
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
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (expected a JSON object, found "
                              f"{type(header).__name__})")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__: expected an object of strings, found {metadata!r:.80}")
    data_start = 8 + n
    spans = {name: _check_entry(path, name, info, exact) for name, info in header.items()}
    _check_layout(path, spans, size - data_start, data_start)
    try:
        with safe_open(path, framework="pt") as st:
            official = set(st.keys())
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    if official != header.keys():  # both parsers refuse duplicates; this is an internal invariant
        raise CheckpointError(f"{path}: the header's keys are ambiguous (duplicated names?)")
    return header, data_start


def _read_tensor(f, info: dict, data_start: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor ``info`` describes, read into ``out`` (a tensor of its shape and dtype) or a new buffer."""
    shape, (a, b) = info["shape"], info["data_offsets"]
    t = torch.empty(shape, dtype=DTYPES[info["dtype"]]) if out is None else out
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
    """The safetensors files of a checkpoint directory (one file, or the shards of the index). A path that is
    there but cannot be read (a symlink loop, a directory, no permission) is an OSError naming it."""
    index, single = directory / INDEX_FILE, directory / SINGLE_FILE
    has_index = probe_path(index, "the shard index", "file") is not None
    has_single = probe_path(single, "the weights file", "file") is not None
    if has_index and has_single:
        raise CheckpointError(f"{directory}: holds both {SINGLE_FILE} and {INDEX_FILE}; expected one layout "
                              f"(one of them is stale: remove it)")
    if has_index:
        files = [directory / name for name in dict.fromkeys(_read_index(index).values())]
    elif has_single:
        files = [single]
    else:
        raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
    missing = [p.name for p in files if probe_path(p, "the shard", "file") is None]
    if missing:
        raise FileNotFoundError(f"{index}: the index names shard(s) that do not exist in {directory}: {missing}")
    return files


def check_duplicates(files: list[Path], headers: list[tuple[dict, int]]) -> None:
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
                              f"in exactly one:\n  " + "\n  ".join(problems[:MAX_LISTED]) + more(problems))


def check_index(directory: Path, files: list[Path], headers: list[tuple[dict, int]]) -> None:
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
                              + "\n  ".join(problems[:MAX_LISTED]) + more(problems))


def iter_checkpoint(files: list[Path], headers: list[tuple[dict, int]],
                    buffer_for=None) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(parameter name, tensor as stored, file) in file order, each read into its own buffer, or into
    ``buffer_for(name)`` when that gives one (a reused buffer: the caller is done with it before the next read)."""
    for path, (header, start) in zip(files, headers):
        with open(path, "rb") as f:
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                name = RENAMES.get(name, name)
                yield name, _read_tensor(f, info, start, buffer_for and buffer_for(name)), path


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
    try:
        if probe_path(p, "the checkpoint directory", "directory") is not None:
            return p
    except NotADirectoryError as e:
        if not p.is_file():  # a path through a file, or a FIFO: the probe's words
            raise
        raise NotADirectoryError(f"{path} is a file; expected a checkpoint directory (config.json + safetensors)") \
            from e
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


def nonfinite_counts(t: torch.Tensor, chunk: int = 1 << 22) -> tuple[int, int]:
    """(NaN count, inf count) of ``t``, in chunks so that the temporary masks stay small."""
    flat, nan, inf = t.detach().reshape(-1), 0, 0
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk]
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    return nan, inf


def is_finite(t: torch.Tensor) -> bool:
    """True when every value is finite. The screen is a plain sum, ~30x cheaper than ``isfinite(t).all()``
    (no mask to allocate): a NaN or inf anywhere makes the sum NaN or inf. A sum that overflows although
    every value is finite is a false alarm, settled by counting exactly."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if math.isfinite(float(t.detach().sum())):
        return True
    return nonfinite_counts(t) == (0, 0)


def more(problems: list) -> str:
    return f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""


# ---- writing -------------------------------------------------------------------------------------
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_size(size: int | str) -> int:
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
    return f".{final}{TMP_SUFFIX}"


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


def check_save_directory(directory) -> Path:
    """``directory`` as a Path, when it is a directory or a path to create; else TypeError / NotADirectoryError."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path (str or os.PathLike), got {type(directory).__name__}")
    directory = Path(directory)
    try:
        probe_path(directory, "directory:", "directory")  # a path to create, or a directory: anything else raises
    except NotADirectoryError:
        if not os.path.lexists(directory):
            raise
        raise NotADirectoryError(f"directory: {directory} exists and is not a directory; expected a checkpoint "
                                 f"directory (or a path to create)") from None
    return directory


def write(directory: Path, tensors: dict[str, torch.Tensor], config_text: str, max_shard_size: int | str = "5GB",
          files: dict[str, str] | None = None) -> None:
    """The one writer of a checkpoint directory, atomic for every file a save produces: the weights (sharded above
    ``max_shard_size``, with their index), ``files`` (name -> text, e.g. generation_config.json) and
    ``config.json`` (``config_text``), each written under a temporary name and fsynced, then committed with
    config.json last (see the module doc). ``directory`` was checked by :func:`check_save_directory`."""
    limit = parse_size(max_shard_size)
    shards = _plan_shards(tensors, limit)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])

    directory.mkdir(parents=True, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"directory: {directory} is not writable")
    for leftover in directory.glob(f".*{TMP_SUFFIX}"):  # from an interrupted earlier save
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
        for name, text in (files or {}).items():
            tmp = directory / _tmp_name(name)
            staged.append((tmp, directory / name))
            _write_text(tmp, text)
        tmp = directory / _tmp_name(CONFIG_FILE)
        staged.append((tmp, directory / CONFIG_FILE))
        _write_text(tmp, config_text)
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
