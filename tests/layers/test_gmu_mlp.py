import torch
import torch.nn.functional as F
from helpers import assert_close

from sambay.layers import GMU, MLP


def test_gmu_is_out_proj_of_gated_memory():
    torch.manual_seed(0)
    g = GMU(12, 20).double()
    x, mem = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 20, dtype=torch.float64)
    ref = (F.silu(x @ g.in_proj.weight.T) * mem) @ g.out_proj.weight.T
    assert_close("gmu", g(x, mem), ref, 1e-12)


def test_mlp_gate_is_the_first_half_of_fc1():
    torch.manual_seed(0)
    m = MLP(12, 10).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    u = x @ m.fc1.weight.T
    ref = (F.silu(u[..., :10]) * u[..., 10:]) @ m.fc2.weight.T
    assert_close("mlp", m(x), ref, 1e-12)
