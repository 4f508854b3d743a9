import pytest

import sambay


def test_public_api_is_pinned():
    assert sorted(sambay.__all__) == sorted(["SambaYConfig", "SambaYForCausalLM", "SambaYModel", "SambaYCache",
                                             "CausalLMOutput", "cache_nbytes", "from_pretrained", "generate"])
    for name in sambay.__all__:
        assert getattr(sambay, name) is not None


@pytest.mark.slow
def test_import_pulls_in_no_optional_cuda_package():
    import subprocess
    import sys

    code = ("import sys, sambay; bad = [m for m in ('triton', 'mamba_ssm', 'causal_conv1d', 'flash_attn') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
