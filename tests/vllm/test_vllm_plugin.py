"""The plugin's registration, in the vLLM environment."""

import subprocess
import sys

REGISTRATION = """
import sys
import sambay
assert "vllm" not in sys.modules, "import sambay imported vllm"
from vllm import ModelRegistry
from vllm.plugins import load_general_plugins
load_general_plugins()  # what every vLLM process does: runs sambay.vllm.register through the entry point
from vllm.transformers_utils.config import _CONFIG_REGISTRY
assert "Phi4FlashForCausalLM" in ModelRegistry.get_supported_archs()
assert _CONFIG_REGISTRY["phi4flash"].__module__ == "sambay.vllm.config"
"""


def test_entry_point_registers_the_architecture_and_config():
    out = subprocess.run([sys.executable, "-c", REGISTRATION], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_config_parses_without_trust_remote_code(tmp_path):
    """The released config.json names remote code in auto_map; vLLM parses it with the plugin's class."""
    import json
    import shutil
    from pathlib import Path

    from vllm.transformers_utils.config import get_config

    from sambay.vllm import register

    register()
    src = Path(__file__).resolve().parents[1] / "fixtures" / "phi4-mini-flash-reasoning" / "config.json"
    shutil.copy(src, tmp_path / "config.json")
    assert "auto_map" in json.loads(src.read_text())
    config = get_config(str(tmp_path), trust_remote_code=False)
    assert type(config).__name__ == "Phi4FlashVllmConfig"
    assert config.layer_types[16:19] == ["mamba", "full_attention", "gmu"]
    assert config.architectures == ["Phi4FlashForCausalLM"]
