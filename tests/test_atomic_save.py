"""save_pretrained is atomic: bad arguments write nothing; a save that fails (a full disk) or is killed
(SIGKILL) at any step leaves a directory that loads the old checkpoint exactly, loads the new one exactly,
or is refused loudly; never a mix of the two."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fixture_model

import sambay.checkpoint as C
import sambay.loading as L
from sambay import SambaYForCausalLM
from sambay.loading import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
OLD_SHARD, NEW_SHARD = 100_000, 150_000  # small16 is ~0.5 MB: 5 shards, then 4 others with other names


def _new_model(seed_model=None):
    """The fixture with every weight changed, so that old, new and any mix of them are told apart."""
    m = seed_model or fixture_model("small16")
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5).add_(0.01)
    return m


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


def _which(d: Path, old, new) -> str:
    """'old' / 'new' when the directory loads as exactly one of them, 'mix' otherwise."""
    loaded = dict(SambaYForCausalLM.from_pretrained(d).named_parameters())
    for label, ref in (("old", old), ("new", new)):
        if all(torch.equal(loaded[n], p) for n, p in ref.named_parameters()):
            return label
    return "mix"


def _save_old(d: Path, layout: str):
    old = fixture_model("small16")
    old.save_pretrained(d, **({"max_shard_size": OLD_SHARD} if layout == "sharded" else {}))
    (d / "tokenizer.json").write_text("{}")  # a file that is not the save's: must survive every save
    return old


# ---- arguments are validated before anything is written --------------------------------------------
@pytest.mark.parametrize("size, kind, words", [
    ("5XB", ValueError, "got '5XB'"), ("abc", ValueError, "got 'abc'"), ("", ValueError, "got ''"),
    (0, ValueError, "got 0"), (-5, ValueError, "got -5"), ("0MB", ValueError, "got '0MB'"),
    (True, TypeError, "got True (bool)"), (1.5e9, TypeError, "got 1500000000.0 (float)"),
    (None, TypeError, "got None (NoneType)"),
])
@pytest.mark.slow
def test_a_bad_max_shard_size_writes_nothing(tmp_path, size, kind, words):
    old = _save_old(tmp_path / "ckpt", "single")
    before = _snapshot(tmp_path / "ckpt")
    with pytest.raises(kind) as e:
        _new_model().save_pretrained(tmp_path / "ckpt", max_shard_size=size)
    assert "max_shard_size: expected a positive number of bytes, or a size such as '5GB'" in str(e.value)
    assert words in str(e.value)
    assert _snapshot(tmp_path / "ckpt") == before
    with pytest.raises(kind):
        _new_model(old).save_pretrained(tmp_path / "fresh", max_shard_size=size)
    assert not (tmp_path / "fresh").exists()


def test_size_strings_use_hf_units(tmp_path):
    assert [C.parse_size(s) for s in ("5GB", "500MB", "2GiB", "1.5KB", " 7 kib ", "100", 123)] == [
        5 * 10**9, 500 * 10**6, 2 * 2**30, 1500, 7 * 1024, 100, 123]


def test_a_bad_directory_or_model_writes_nothing(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("keep me")
    model = fixture_model("small16")
    with pytest.raises(NotADirectoryError, match="directory: .*a-file exists and is not a directory"):
        model.save_pretrained(f)
    assert f.read_text() == "keep me"
    with pytest.raises(TypeError, match="directory: expected a path .str or os.PathLike., got int"):
        L.save_pretrained(model, 3)
    with pytest.raises(TypeError, match="model: expected a SambaYForCausalLM, got Linear"):
        L.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_non_finite_weights_are_not_saved_unless_asked(tmp_path):
    model = fixture_model("small16")
    with torch.no_grad():
        model.model.layers[3].mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError) as e:
        model.save_pretrained(tmp_path / "ckpt")
    assert "model: refusing to save non-finite weights (1 tensor(s)); nothing was written" in str(e.value)
    assert "model.layers.3.mlp.fc2.weight: 1 NaN and 0 inf value(s)" in str(e.value)
    assert not (tmp_path / "ckpt").exists()
    L.save_pretrained(model, tmp_path / "ckpt", check_finite=False)
    with pytest.raises(CheckpointError, match="model.layers.3.mlp.fc2.weight"):
        SambaYForCausalLM.from_pretrained(tmp_path / "ckpt")
    loaded = L.from_pretrained(tmp_path / "ckpt", SambaYForCausalLM, check_finite=False)
    torch.testing.assert_close(loaded.model.layers[3].mlp.fc2.weight, model.model.layers[3].mlp.fc2.weight,
                               rtol=0, atol=0, equal_nan=True)


# ---- stale files of the other layout or of an older save never mix in ------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("old_layout, new_shard", [("sharded", None), ("single", NEW_SHARD), ("sharded", NEW_SHARD)])
def test_stale_files_are_removed_after_a_complete_save(tmp_path, old_layout, new_shard):
    d = tmp_path / "ckpt"
    old = _save_old(d, old_layout)
    (d / ".model.safetensors.sambay-tmp").write_bytes(b"left by a killed save")
    new = _new_model()
    new.save_pretrained(d, **({} if new_shard is None else {"max_shard_size": new_shard}))
    names = sorted(p.name for p in d.iterdir())
    if new_shard is None:
        assert names == ["config.json", "generation_config.json", "model.safetensors", "modeling_sambay.py",
                         "tokenizer.json"]
    else:
        index = json.loads((d / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert names == sorted(["config.json", "generation_config.json", "model.safetensors.index.json",
                                "modeling_sambay.py", "tokenizer.json", *shards])
    assert _which(d, old, new) == "new"


# ---- a failure midway (a full disk) leaves the old checkpoint ------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("old_layout", ["single", "sharded"])
@pytest.mark.parametrize("fail_at", ["second shard", "config.json"])
def test_a_full_disk_midway_leaves_the_old_checkpoint_exactly(tmp_path, monkeypatch, old_layout, fail_at):
    d = tmp_path / "ckpt"
    old = _save_old(d, old_layout)
    before = _snapshot(d)
    calls = []

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fail_at == "second shard":
        real = C.save_file

        def save_file(tensors, path, *args, **kwargs):
            calls.append(path)
            if len(calls) == 2:
                Path(path).write_bytes(b"half a shard")  # what a full disk leaves behind
                full_disk()
            return real(tensors, path, *args, **kwargs)

        monkeypatch.setattr(C, "save_file", save_file)
    else:
        real_text = C._write_text

        def write_text(path, text):
            calls.append(path)
            if path.name.startswith(".config.json"):
                full_disk()
            return real_text(path, text)

        monkeypatch.setattr(C, "_write_text", write_text)
    with pytest.raises(OSError, match="No space left on device"):
        _new_model().save_pretrained(d, max_shard_size=NEW_SHARD)
    assert calls, "the failure was not injected"
    assert _snapshot(d) == before  # not one byte changed, no temporary file left
    monkeypatch.undo()
    assert _which(d, old, _new_model()) == "old"


# ---- a SIGKILL at each step of the commit --------------------------------------------------------------
# One fresh process (torch imported once) forks a child per scenario; the child installs a hook that
# SIGKILLs itself before or after the n-th call of save_file or os.replace, then saves the new model.
_KILLER = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)  # no OpenMP pool: safe to fork
sys.path.insert(0, sys.argv[2])
import sambay.checkpoint as C
import sambay.loading as L
from test_atomic_save import _new_model

new = _new_model()
results = []
for sc in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        shards = len(C._plan_shards(dict(new.named_parameters()), C.parse_size(sc["max_shard_size"])))
        n = {"last": shards + (shards > 1) + 1}.get(sc["n"], sc["n"])  # the last os.replace is config.json's
        real = {"save_file": C.save_file, "replace": os.replace}[sc["call"]]
        count = [0]
        def hooked(*a, **k):
            count[0] += 1
            if count[0] == n and sc["when"] == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            r = real(*a, **k)
            if count[0] == n and sc["when"] == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return r
        if sc["call"] == "save_file":
            C.save_file = hooked
        else:
            os.replace = hooked
        L.save_pretrained(new, sc["dir"], max_shard_size=sc["max_shard_size"])
        os._exit(3)  # the kill point was never reached
    _, status = os.waitpid(pid, 0)
    results.append(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status))
print("RESULT " + json.dumps(results))
"""

_POINTS = {  # name: (call, n, when, expected outcome)
    "during shard 1": ("save_file", 1, "before", "old"),
    "after shard 2": ("save_file", 2, "after", "old"),
    "commit start": ("replace", 1, "before", "refused"),
    "after 1st rename": ("replace", 1, "after", "refused"),
    "before config.json": ("replace", "last", "before", "refused"),
    "after config.json": ("replace", "last", "after", "new"),  # before the stale shards are removed
}


def _run_killer(scenarios: list[dict]) -> list[int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(scenarios), str(ROOT / "tests")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_a_sigkill_at_any_step_loads_old_or_new_exactly_or_fails_loudly(tmp_path):
    layouts = {"sharded->sharded": ("sharded", NEW_SHARD), "single->sharded": ("single", NEW_SHARD),
               "sharded->single": ("sharded", "5GB")}
    cases = [(lay, pt) for lay in layouts for pt in _POINTS
             if lay == "sharded->sharded" or pt in ("after shard 2", "commit start", "after config.json")]
    cases = [(lay, pt) for lay, pt in cases if not (layouts[lay][1] == "5GB" and pt == "after shard 2")]
    cases.append(("sharded->single", "during shard 1"))
    scenarios, olds = [], {}
    for lay, pt in cases:
        d = tmp_path / f"{lay}-{pt}".replace(" ", "_").replace(">", "")
        olds[d] = _save_old(d, layouts[lay][0])
        call, n, when, _ = _POINTS[pt]
        scenarios.append({"dir": str(d), "max_shard_size": layouts[lay][1], "call": call, "n": n, "when": when})
    signals = _run_killer(scenarios)
    assert signals == [signal.SIGKILL] * len(scenarios), list(zip(cases, signals))
    new = _new_model()
    for (lay, pt), sc in zip(cases, scenarios):
        d, expected = Path(sc["dir"]), _POINTS[pt][3]
        if expected == "refused":
            with pytest.raises(CheckpointError, match="temporary files of an interrupted save_pretrained"):
                SambaYForCausalLM.from_pretrained(d)
        else:
            assert _which(d, olds[d], new) == expected, (lay, pt)
        assert (d / "tokenizer.json").read_text() == "{}"
        new.save_pretrained(d, max_shard_size=sc["max_shard_size"])  # the next save repairs the directory
        assert _which(d, olds[d], new) == "new", (lay, pt)
        assert not [p.name for p in d.iterdir() if p.name.endswith(".sambay-tmp")]


# A kill at an arbitrary moment: a save of ~50 shards, SIGKILLed by the parent after a delay, as a fraction of
# the time a full save takes, denser near the end where the commit is.
_TIMED = r"""
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
import sambay.checkpoint as C
import sambay.loading as L
from test_atomic_save import _new_model

new, shard = _new_model(), 10_000
dirs = json.loads(sys.argv[1])
FRACTIONS = [0.3, 0.6, 0.85, 0.9, 0.94, 0.97, 1.0, 1.03, 1.1, 1.5][:len(dirs)]
t0 = time.perf_counter(); L.save_pretrained(new, dirs[0] + "-timing", max_shard_size=shard)
full = time.perf_counter() - t0
outcomes = []
for i, d in enumerate(dirs):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r); os.write(w, b"go"); os.close(w)
        L.save_pretrained(new, d, max_shard_size=shard)
        os._exit(0)
    os.close(w); os.read(r, 2); os.close(r)
    time.sleep(full * FRACTIONS[i])
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    outcomes.append("killed" if os.WIFSIGNALED(status) else "finished")
print("RESULT " + json.dumps({"full_s": full, "outcomes": outcomes}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_a_sigkill_at_random_moments(tmp_path):
    dirs = [tmp_path / f"ckpt{i}" for i in range(10)]
    olds = {d: _save_old(d, "sharded") for d in dirs}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _TIMED, json.dumps([str(d) for d in dirs]), str(ROOT / "tests")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = _new_model()
    for d in dirs:
        try:
            outcome = _which(d, olds[d], new)
        except CheckpointError as e:
            assert "interrupted save_pretrained" in str(e)
            outcome = "refused"
        assert outcome in ("old", "new", "refused"), d
