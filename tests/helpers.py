"""Shared test helpers: fixture loading and dtype-aware comparisons."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sambay import SambaYForCausalLM

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path(__file__).parent.parent / "configs"


def load_fixture(name: str):
    """(fixture dir, inputs dict, expected dict, decode dict)."""
    d = FIXTURES / name
    return (d, load_file(d / "inputs.safetensors"), load_file(d / "expected.safetensors"),
            load_file(d / "decode.safetensors"))


def fixture_model(name: str, dtype=None) -> SambaYForCausalLM:
    return SambaYForCausalLM.from_pretrained(FIXTURES / name, dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 (NaN-safe: a NaN gives inf)."""
    out, ref = out.detach().double(), ref.detach().double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.1g}"


def random_config(**overrides):
    """A small random-weight config (HF keys), the released layout, for property sweeps."""
    from sambay import SambaYConfig

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=5)
    base.update(overrides)
    return SambaYConfig.from_dict(base)


def random_model(seed: int = 0, dtype=torch.float32, **overrides) -> SambaYForCausalLM:
    torch.manual_seed(seed)
    model = SambaYForCausalLM(random_config(**overrides)).to(dtype).eval()
    with torch.no_grad():  # larger-than-init weights so that every layer matters in the comparisons
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif "lambda" in name:
                p.normal_(0, 0.1)
            elif name.endswith("bias") and "dt_proj" not in name:
                p.normal_(0, 0.02)
    return model
