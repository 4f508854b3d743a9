"""The vLLM plugin's tests run in the vLLM environment (``.ci/vllm_env.sh`` builds it; ``.ci/run`` runs
``$SAMBAY_VLLM_PYTHON -m pytest -q tests/vllm`` after the main suite). In an environment without vLLM they are not
collected at all (``tests/test_vllm_env.py`` is what fails in CI when that environment is missing)."""

import importlib.metadata
import os

# Before vLLM is imported: a small CPU KV cache (GB), the engine in this process (no spawned engine core), one
# OpenMP thread without binding (tiny models on a shared 2-core machine: a second spinning thread costs 100x).
for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                   "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(key, value)


def _has_vllm() -> bool:
    # By distribution, not find_spec("vllm"): with tests/ on sys.path this directory itself looks like a
    # (namespace) package named vllm.
    for name in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


if not _has_vllm():
    collect_ignore_glob = ["test_*.py"]
