import pytest
import torch
from helpers import CONFIGS, random_model

from sambay import SambaYConfig, SambaYForCausalLM, cache_nbytes
from sambay.cache import FullKV, MambaState, SlidingKV


def test_layer_states_follow_the_roles():
    model = random_model(num_hidden_layers=8, sliding_window=5)
    cache = model.allocate_cache(2, 30)
    kinds = [type(s).__name__ if s is not None else None for s in cache.layers]
    assert kinds == ["MambaState", "SlidingKV", "MambaState", "SlidingKV", "MambaState", "FullKV", None, None]
    assert cache.layers[0].ssm.dtype == torch.float32
    assert cache.layers[1].k.shape[3] == 5 and cache.layers[5].k.shape[3] == 30
    assert isinstance(cache.shared_kv, FullKV) and isinstance(cache.layers[1], SlidingKV)
    assert isinstance(cache.layers[0], MambaState) and cache.layers[0].conv.shape == (2, 64, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_equals_formula_and_allocation(dtype):
    model = random_model(dtype=dtype)
    cache = model.allocate_cache(3, 17)
    allocated = cache.valid.nbytes + sum(t.nbytes for s in cache.layers if s is not None for t in vars(s).values())
    assert cache.nbytes == allocated == cache_nbytes(model.config, 3, 17, dtype)


def test_released_config_state_size_at_32k():
    config = SambaYConfig.from_pretrained(CONFIGS / "phi4-mini-flash-reasoning.json")
    with torch.device("meta"):
        model = SambaYForCausalLM(config, dtype=torch.bfloat16)
    cache = model.allocate_cache(1, 32768)  # on meta: no memory
    assert cache.nbytes == cache_nbytes(config, 1, 32768, torch.bfloat16)
    mib = cache.nbytes / 2**20
    assert 182 < mib < 184, mib
    transformer = 32 * 20 * 64 * 2 * 2 * 32768  # same-shape transformer: K and V, 32 layers, bf16
    assert transformer / 2**30 == 5.0
    assert transformer / cache.nbytes > 27
    assert 42 < cache_nbytes(config, 1, 4096) / 2**20 < 44 and 342 < cache_nbytes(config, 1, 65536) / 2**20 < 344


def test_cache_errors_are_clear():
    model = random_model()
    cache = model.allocate_cache(2, 8)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(ValueError, match=r"cache overflow: 5 tokens cached \+ 4 new > max_length=8"):
            model(ids[:, :4], cache=cache)
        with pytest.raises(ValueError, match="cache batch size mismatch: the cache holds 2 sequences, the input has 1"):
            model(ids[:1, :1], cache=cache)
        bad = model.allocate_cache(2, 8, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="cache dtype/device mismatch"):
            model(ids, cache=bad)
        with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 7\)"):
            model(ids[:, :2], attention_mask=torch.ones(2, 2), cache=cache)


def test_reset_makes_the_cache_reusable():
    model = random_model()
    ids = torch.randint(0, 64, (1, 9))
    cache = model.allocate_cache(1, 9)
    with torch.no_grad():
        a = model(ids, cache=cache).logits
        cache.reset()
        b = model(ids, cache=cache).logits
    assert torch.equal(a, b) and cache.length == 9


def test_ring_writes_in_place_without_reallocating():
    model = random_model(sliding_window=4)
    cache = model.allocate_cache(1, 20)
    ring = cache.layers[1]
    ptr = ring.k.data_ptr()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 3)), cache=cache)
        for _ in range(12):
            model(torch.randint(0, 64, (1, 1)), cache=cache)
    assert ring.k.data_ptr() == ptr
    assert ring.positions(14).tolist() == [12, 13, 14, 11]
