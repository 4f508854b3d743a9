"""The ``cuda`` extra's minimum versions work with the transformers the other extras resolve to.

mamba-ssm imports ``mamba_ssm.utils.generation`` at package import (via ``mamba_ssm/__init__.py`` -> models ->
utils), which imports names from ``transformers.generation``. Before 2.3.0 those included
``GreedySearchDecoderOnlyOutput`` (mamba ``mamba_ssm/utils/generation.py:14`` at v2.2.0 .. v2.2.6.post3), which
transformers 5 removed: with ``mamba-ssm>=2.2`` a resolver may pick a release whose import fails, and the fast path
is lost. causal-conv1d before 1.4.0 required a conv state of ``width`` columns (``csrc/causal_conv1d.cpp:406`` at
v1.2.0: ``CHECK_SHAPE(conv_state, batch_size, dim, width)``); sambay's decode state holds ``width - 1`` (allowed
from 1.4.0, ``causal_conv1d.cpp:407-408``). flash-attn's ``flash_attn_func(..., window_size=)`` exists since 2.3.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]

# What each mamba-ssm release line imports from transformers.generation (upstream mamba_ssm/utils/generation.py:14).
MAMBA_TRANSFORMERS_IMPORTS = {
    (2, 2): ("GreedySearchDecoderOnlyOutput", "SampleDecoderOnlyOutput", "TextStreamer"),
    (2, 3): ("GenerateDecoderOnlyOutput", "TextStreamer"),
}


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _minimum(requirements: list[str], package: str) -> tuple[int, ...]:
    for req in requirements:
        m = re.fullmatch(rf"{re.escape(package)}\s*>=\s*([0-9][0-9.]*)(\.post\d+)?", req.strip())
        if m:
            return tuple(int(p) for p in m.group(1).split("."))
    raise AssertionError(f"pyproject.toml: expected '{package}>=X.Y' in the cuda extra, got {requirements}")


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"[0-9.]+", v).group(0).rstrip(".").split("."))


def test_cuda_extra_minimums():
    cuda = _extras()["cuda"]
    assert _minimum(cuda, "mamba-ssm") >= (2, 3, 0)
    assert _minimum(cuda, "causal-conv1d") >= (1, 4, 0)
    assert _minimum(cuda, "flash-attn") >= (2, 3)


def test_mamba_minimum_imports_with_the_resolved_transformers():
    """The names the minimum mamba-ssm imports exist in the transformers the other extras resolve to (the one
    installed here, which satisfies every extra's transformers requirement)."""
    transformers = pytest.importorskip("transformers")
    import transformers.generation as generation

    installed = _version(transformers.__version__)
    for extra, reqs in _extras().items():
        for req in reqs:
            m = re.fullmatch(r"transformers\s*>=\s*([0-9.]+)", req.strip())
            if m:
                assert installed >= _version(m.group(1)), f"extra {extra!r}: {req} vs installed {installed}"
    line = _minimum(_extras()["cuda"], "mamba-ssm")[:2]
    missing = [n for n in MAMBA_TRANSFORMERS_IMPORTS[line] if not hasattr(generation, n)]
    assert not missing, f"mamba-ssm {line} imports {missing} from transformers.generation, absent in {installed}"


@pytest.mark.slow
def test_installed_mamba_imports_exist_in_transformers():
    """If mamba-ssm is installed (CI installs 2.3.2.post1 Python-only), read what its sources import from
    transformers and check every name exists."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        pytest.skip("mamba-ssm is not installed")
    pytest.importorskip("transformers")
    root = Path(spec.origin).parent
    names = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
                names += [(node.module, a.name, path.relative_to(root)) for a in node.names]
    assert names, "expected mamba_ssm to import from transformers"
    for module, name, path in names:
        mod = importlib.import_module(module)
        assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}") is not None, (
            f"mamba_ssm/{path} imports {name} from {module}, which the installed transformers lacks")
