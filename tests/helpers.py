"""Shared test helpers: fixtures, the tiny configs, random weights and error measures (one definition each)."""

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


# The released layout at toy size (8 layers, hidden 32, window 5), for random-weight property sweeps. (The bench
# smoke tests use configs/sambay-tiny.json, the fixtures their own config.json.)
SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 8, "num_attention_heads": 4,
         "num_key_value_heads": 2, "sliding_window": 5}


def random_config(**overrides):
    """SMALL with overrides (HF config keys)."""
    from sambay import SambaYConfig

    return SambaYConfig.from_dict({**SMALL, **overrides})


# The smallest config that still has every layer role (gradcheck: every Jacobian entry is a forward pass).
MICRO = {"vocab_size": 11, "hidden_size": 4, "intermediate_size": 3, "num_hidden_layers": 8, "num_attention_heads": 2,
         "num_key_value_heads": 2, "sliding_window": 2, "mamba_d_state": 2, "mamba_d_conv": 2, "mamba_expand": 1,
         "mamba_dt_rank": 1}


def randomize(module: torch.nn.Module, seed: int, vector_std: float = 0.1, dtype: torch.dtype | None = None,
              mamba_ranges: bool = False) -> torch.nn.Module:
    """O(1) random weights for a layer so that no path is numerically negligible: matrices N(0, 1/fan_in),
    vectors N(0, vector_std). mamba_ranges: A in [-e^2, -1] and dt biases in [-3, -1] (softplus far from its
    threshold), for gradcheck."""
    torch.manual_seed(seed)
    if dtype is not None:
        module = module.to(dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if mamba_ranges and name.endswith("A_log"):
                p.copy_(torch.rand_like(p) * 2)
            elif mamba_ranges and name.endswith("dt_proj.bias"):
                p.uniform_(-3, -1)
            elif p.dim() == 1:
                p.normal_(0, vector_std)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    return module


def random_mamba(C: int, E: int, d_state: int, dt_rank: int, memory_producer: bool = False, seed: int = 0,
                 dtype: torch.dtype = torch.float32, conv_bias_std: float | None = None):
    """A Mamba layer with its own initialisation, then A and D moved off their init values (so a wrong A or D
    shows) and, with conv_bias_std, a random conv bias."""
    from sambay.layers import Mamba

    torch.manual_seed(seed)
    m = Mamba(C, E, d_state=d_state, d_conv=4, dt_rank=dt_rank, memory_producer=memory_producer)
    m.reset_parameters()
    with torch.no_grad():
        m.A_log.add_(torch.randn_like(m.A_log) * 0.3)
        m.D.normal_(1, 0.2)
        if conv_bias_std is not None:
            m.conv1d.bias.normal_(0, conv_bias_std)
    return m.to(dtype)


def max_abs_err(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """max |actual - exact| in float64."""
    return (actual.double() - exact.double()).abs().max().item()


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
