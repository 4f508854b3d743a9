"""Weight-only quantization (sambay.quant): the ops against their twins, the formats, the quantized model against
the same weights held dense and against the fp32 reference, decode, compile, training, and the checkpoints (save/load
bit-exact, quantizing while loading, other formats refused)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import FIXTURES, fixture_model, load_fixture, random_model, rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_loading_memory import _config, measure, write_random_checkpoint
from test_model import _run_with_taps

from sambay import SambaYForCausalLM
from sambay.kernels import active_backends
from sambay.kernels import linear as ops
from sambay.kernels.linear import ref as quant_ref
from sambay.layers import Linear, QuantLinear
from sambay.loading import CheckpointError
from sambay.quant import QuantizationConfig

pytestmark = pytest.mark.usefixtures("one_thread")

KERNELS = active_backends("cpu")["linear"] == "sambay_cpu"
needs_kernels = pytest.mark.skipif(not KERNELS, reason="sambay's CPU kernels are not available on this machine")
FP32 = 1e-4  # the fixture and decode tests' fp32 tolerance (test_model.py, test_generation.py)
BF16_EPS = 2.0**-8
FORMATS = [pytest.param("int8", None, id="int8"), pytest.param("int4", 32, id="int4-g32")]


def dense_twin(model):
    """``model`` with every QuantLinear replaced by a dense fp32 Linear holding its dequantized weight, and every
    other tensor in fp32 (exact: bf16 -> fp32 loses nothing): the same weights without the quantized storage."""
    twin = copy.deepcopy(model)
    for name, q in list(twin.named_modules()):
        if isinstance(q, QuantLinear):
            lin = Linear(q.in_features, q.out_features, bias=q.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(q.dequantize())
                if q.bias is not None:
                    lin.bias.copy_(q.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin)
    return twin.float()


@pytest.fixture()
def spy(monkeypatch):
    """Counts the calls of each torch.ops.sambay_cpu linear kernel."""
    calls = {"linear_dense": 0, "linear_int8": 0, "linear_int4": 0}
    for op in calls:
        real = getattr(torch.ops.sambay_cpu, op)

        def counted(*args, _op=op, _real=real):
            calls[_op] += 1
            return _real(*args)

        monkeypatch.setattr(torch.ops.sambay_cpu, op, counted)
    return calls


# ---- the ops: CPU kernels (backend "auto", 1..8 rows) against the dequantize-matmul twins ------------------------
def _close_to_twin(got: torch.Tensor, twin: torch.Tensor) -> None:
    """fp32: the two differ only in the order of the fp32 sums: max error <= 1e-5 of max |twin| (measured up to
    ~1e-6 at K = 1024). bf16 outputs: each side rounds its fp32 result once, so they are equal or one bf16 ulp
    apart (<= 2^-7 relative)."""
    assert got.dtype == twin.dtype and got.shape == twin.shape
    if got.dtype == torch.float32:
        assert rel_err(got, twin) <= 1e-5, rel_err(got, twin)
    else:
        a, b = got.double(), twin.double()
        assert ((a - b).abs() <= 2.0**-7 * torch.maximum(a.abs(), b.abs()) + 1e-30).all()
        assert (a == b).double().mean() >= 0.9


def _inputs(rows, K, dtype, bias_dtype, N):
    x = torch.randn(rows, K).to(dtype)
    if rows == 8:
        x = x.view(2, 4, K)  # leading dims are flattened into rows
    bias = None if bias_dtype is None else torch.randn(N).to(bias_dtype)
    return x, bias


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("N, K", [(1, 16), (5, 7), (33, 40), (64, 100), (17, 513)])
@pytest.mark.parametrize("dtype, bias_dtype", [(torch.float32, None), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_int8_kernel_equals_its_twin(spy, rows, N, K, dtype, bias_dtype):
    qweight, scales = quant_ref.quantize_int8(torch.randn(N, K))
    x, bias = _inputs(rows, K, dtype, bias_dtype, N)
    got = ops.linear_int8(x, qweight, scales, bias)
    assert spy["linear_int8"] == 1
    _close_to_twin(got, ops.linear_int8(x, qweight, scales, bias, backend="torch"))
    assert spy["linear_int8"] == 1  # the twin did not call it


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("group_size, N, K", [(32, 3, 32), (32, 17, 96), (64, 64, 192), (128, 5, 256),
                                              (256, 9, 512)])
@pytest.mark.parametrize("dtype, bias_dtype", [(torch.float32, None), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_int4_kernel_equals_its_twin(spy, rows, group_size, N, K, dtype, bias_dtype):
    qweight, scales, mins = quant_ref.quantize_int4(torch.randn(N, K), group_size)
    x, bias = _inputs(rows, K, dtype, bias_dtype, N)
    got = ops.linear_int4(x, qweight, scales, mins, group_size, bias)
    assert spy["linear_int4"] == 1
    _close_to_twin(got, ops.linear_int4(x, qweight, scales, mins, group_size, bias, backend="torch"))


@needs_kernels
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("N, K", [(1, 16), (5, 7), (33, 40), (64, 100), (17, 513)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_bf16_kernel_equals_f_linear_in_fp32(spy, rows, N, K, dtype):
    w = torch.randn(N, K).bfloat16()
    x, bias = _inputs(rows, K, dtype, torch.bfloat16, N)
    got = ops.linear(x, w, bias)
    assert spy["linear_dense"] == 1
    _close_to_twin(got, F.linear(x.float(), w.float(), bias.float()).to(dtype))


@needs_kernels
def test_the_kernels_are_skipped_where_they_do_not_apply(spy):
    """Prefill-sized calls (> 8 rows) and calls that need a gradient take the twin."""
    qweight, scales = quant_ref.quantize_int8(torch.randn(8, 32))
    ops.linear_int8(torch.randn(9, 32), qweight, scales)
    ops.linear_int8(torch.randn(1, 32, requires_grad=True), qweight, scales)
    assert spy["linear_int8"] == 0
    ops.linear_int8(torch.randn(1, 32), qweight, scales)
    assert spy["linear_int8"] == 1


# ---- the formats -----------------------------------------------------------------------------------------------
def test_int8_format_rounds_each_row_to_its_own_scale():
    w = torch.randn(37, 100, dtype=torch.float64) * torch.rand(37, 1, dtype=torch.float64) * 3
    w[5] = 0  # an all-zero row: scale 1, all codes 0
    q, s = quant_ref.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (37,)
    assert q.abs().max() <= 127 and (q[torch.arange(37) != 5].abs().amax(1) == 127).all()
    assert s[5] == 1 and (q[5] == 0).all()
    err = (w - quant_ref.dequantize_int8(q, s).double()).abs()
    # round to nearest of w/s (fp32 division) and the fp32 scale: within s/2, up to fp32 rounding of w
    assert (err <= s.double()[:, None] / 2 * (1 + 2**-20) + w.abs() * 2**-23).all()


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_format_rounds_each_group_to_its_scale_and_min(group_size):
    N, K, G = 11, 512, group_size
    w = torch.randn(N, K, dtype=torch.float64) * 0.05 + torch.randn(N, 1, dtype=torch.float64)
    q, s, m = quant_ref.quantize_int4(w, G)
    assert (q.dtype, s.dtype, m.dtype) == (torch.uint8, torch.bfloat16, torch.bfloat16)
    assert q.shape == (N, K // 2) and s.shape == m.shape == (N, K // G)
    wg = w.view(N, K // G, G)
    lo, hi = wg.amin(-1), wg.amax(-1)
    sd, md = s.double(), m.double()
    err = (wg - quant_ref.dequantize_int4(q, s, m, G).double().view(N, K // G, G)).abs().amax(-1)
    # s/2 from rounding to the nearest code; beyond the codes' range [m, m + 15 s] (the bf16 rounding of the min,
    # and of the scale, which can end that range below the max) the clamp adds the distance to the group's ends
    beyond = torch.maximum(md - lo, hi - (md + 15 * sd)).clamp_min(0)
    assert (err <= sd / 2 + beyond + 1e-6 * wg.abs().amax(-1)).all()
    assert (md - lo).abs().max() <= (lo.abs() * 2**-8).max()  # the min is lo rounded to bf16


def test_int4_nibble_order():
    """Column 2j in the low nibble of byte j, 2j+1 in the high one: codes 0..15 laid out as a ramp."""
    codes = torch.arange(64) % 16
    w = codes.float()[None].repeat(2, 1)  # each group of 32 spans 0..15: scale 1, min 0, q = w
    q, s, m = quant_ref.quantize_int4(w, 32)
    assert (s == 1).all() and (m == 0).all()
    assert torch.equal(q[0, :3], torch.tensor([0 | 1 << 4, 2 | 3 << 4, 4 | 5 << 4], dtype=torch.uint8))
    assert torch.equal(quant_ref.unpack_int4(q)[0], codes.to(torch.uint8))


def test_quantizing_in_row_blocks_changes_no_bit(monkeypatch):
    w = torch.randn(300, 256)
    whole8, whole4 = quant_ref.quantize_int8(w), quant_ref.quantize_int4(w, 64)
    monkeypatch.setattr(quant_ref, "_QUANTIZE_BLOCK", 1000)  # 3 rows per block
    for a, b in zip(whole8 + whole4, quant_ref.quantize_int8(w) + quant_ref.quantize_int4(w, 64)):
        assert torch.equal(a, b)


# ---- which modules, what stays exact ------------------------------------------------------------------------------
def test_int8_quantizes_every_hot_path_linear_and_nothing_else():
    ref = fixture_model("tiny8")
    model = fixture_model("tiny8").quantize("int8")
    qc = model.config.quantization_config
    linears = {n for n, m in ref.named_modules() if type(m) is Linear}
    assert set(qc.modules) == linears and len(linears) == 39 and "lm_head" in linears
    assert {n for n, m in model.named_modules() if isinstance(m, QuantLinear)} == linears
    assert not any(type(m) is Linear for m in model.modules())
    # everything else keeps its dtype and its exact values; the tied head is a quantized copy
    params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]) and p.dtype == params[name].dtype, name
    assert model.lm_head.qweight.shape == (256, 64) and model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].attn.dt_proj.bias.dtype == torch.float32  # stays fp32 inside the scan


def test_int4_leaves_the_linears_the_group_size_does_not_divide_dense():
    model = fixture_model("tiny8").quantize("int4", group_size=128)
    qc = model.config.quantization_config
    assert qc.weights == "int4" and qc.group_size == 128
    for name, m in model.named_modules():
        if isinstance(m, (Linear, QuantLinear)):
            assert isinstance(m, QuantLinear) == (m.in_features % 128 == 0), name
            assert (name in qc.modules) == isinstance(m, QuantLinear)
    assert type(model.model.layers[0].attn.dt_proj) is Linear  # in_features = dt_rank = 4
    assert model.lm_head is not None and type(model.lm_head) is Linear  # hidden 64: the head stays dense and tied
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert fixture_model("tiny8").quantize("int4").config.quantization_config.group_size == 128  # the default


def test_quantize_refuses_what_it_cannot_do():
    model = fixture_model("tiny8").quantize("int8")
    with pytest.raises(ValueError, match="already quantized \\(int8, 39 modules\\)"):
        model.quantize("int4")
    config = fixture_model("tiny8").config
    with torch.device("meta"):
        meta = SambaYForCausalLM(config)
    with pytest.raises(ValueError, match="on the meta device .* e.g. lm_head"):
        meta.quantize("int8")
    for weights, group_size, words in [("int2", None, "expected weights 'int8' or 'int4', got 'int2'"),
                                       ("int8", 32, "int8 is per output channel .* expected None, got 32"),
                                       ("int4", 100, "int4 needs one of \\(32, 64, 128, 256\\), got 100"),
                                       ("int4", 256, "no linear of this model can be quantized to int4")]:
        with pytest.raises(ValueError, match=words):
            fixture_model("tiny8").quantize(weights, group_size)
    odd = fixture_model("tiny8")
    odd.model.layers[0].mlp.fc1.weight = torch.nn.Parameter(torch.zeros(256, 64, dtype=torch.int32),
                                                            requires_grad=False)
    with pytest.raises(TypeError, match="expected float weights, got model.layers.0.mlp.fc1 \\(torch.int32\\)"):
        odd.quantize("int8")


def test_casting_a_quantized_model_keeps_the_formats():
    model = fixture_model("tiny8").quantize("int4", 32)
    before = {n: b.clone() for n, b in model.named_buffers()}
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.model.layers[1].attn.Wqkv.bias.dtype == torch.bfloat16
    for name, b in model.named_buffers():
        assert b.dtype == before[name].dtype and torch.equal(b, before[name]), name


# ---- the quantized model: exact against its dense twin, bounded against the fp32 reference ------------------------
@pytest.mark.parametrize("weights, group_size", FORMATS)
@pytest.mark.parametrize("name", ["tiny8", "small16"])
def test_quantized_model_equals_the_same_weights_held_dense(name, weights, group_size):
    """The exactness check: QuantLinear computes x @ dequantize(W)^T in fp32, so an fp32 quantized model equals the
    model with dense fp32 linears holding the dequantized weights, at every layer, to fp32 precision (the prefill
    takes the twins; measured bit-equal)."""
    _, inp, _, _ = load_fixture(name)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    model = fixture_model(name).quantize(weights, group_size)
    taps, twin = _run_with_taps(model, ids, mask), _run_with_taps(dense_twin(model), ids, mask)
    real = mask.bool()
    for key in [f"hidden.{i}" for i in range(model.config.num_hidden_layers)] + ["memory", "logits"]:
        assert rel_err(taps[key][real], twin[key][real]) <= 1e-5, key


def _bound_errors(model, name):
    """Per layer (rel_err over the real positions): the model's error against the fp32 fixture, and the floor: the
    error of the model's own weights (dequantized, the others as stored) computed in fp32, i.e. what the weight
    rounding alone causes."""
    _, inp, exp, _ = load_fixture(name)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    real = mask.bool()
    taps, ftaps = _run_with_taps(model, ids, mask), _run_with_taps(dense_twin(model), ids, mask)
    keys = [f"hidden.{i}" for i in range(model.config.num_hidden_layers)] + ["logits"]
    errors = {k: (rel_err(taps[k][real], exp[k][real]), rel_err(ftaps[k][real], exp[k][real])) for k in keys}
    return errors, taps["logits"][real].double(), ftaps["logits"][real].double(), exp["logits"][real].double()


@pytest.mark.parametrize("weights, group_size", FORMATS)
@pytest.mark.parametrize("name", ["tiny8", "small16"])
def test_bf16_quantized_model_tracks_fp32_reference_within_its_rounding_bound(name, weights, group_size):
    """The bound is derived from the weights alone, as in test_model's bf16 test: the floor is the fp32 model run
    with exactly this model's weights (dequantized; the rest rounded to bf16), so it measures nothing but the
    rounding of the weights; bf16 compute may add at most as much again plus one bf16 rounding. Measured on these
    random fixtures: the int8 floor is 6-10% of max |logit| and the model stays within 1.2-1.4x of it; int4 moves
    random weights by ~8% each and the logits by as much as their spread (floor 0.67-0.93)."""
    model = fixture_model(name, dtype=torch.bfloat16).quantize(weights, group_size)
    errors, logits, floor, ref = _bound_errors(model, name)
    for key, (err, fl) in errors.items():
        assert err <= 2 * fl + BF16_EPS, f"{key}: error {err:.3g} > 2 x floor {fl:.3g} + eps"
    # Per position i the same bound on every logit: B_i = 2 max|floor_i - ref_i| + eps max|ref_i|. Where the fp32
    # top-1 margin exceeds 2 B_i, no logit error within the bound can change the argmax: it must agree.
    scale = ref.abs().amax(-1)
    bound = 2 * (floor - ref).abs().amax(-1) + BF16_EPS * scale
    assert ((logits - ref).abs().amax(-1) <= bound).all()
    top2 = ref.topk(2, dim=-1).values
    decided = top2[:, 0] - top2[:, 1] > 2 * bound
    assert torch.equal(logits.argmax(-1)[decided], ref.argmax(-1)[decided])
    if weights == "int8":  # int4's rounding decides no position of these random fixtures (see the docstring)
        assert decided.sum() >= 3, f"only {int(decided.sum())} decided positions: the argmax check is empty"


@pytest.mark.parametrize("wrong", ["one-layer", "every-layer"])
def test_rounding_bound_rejects_a_slightly_wrong_int8_model(wrong):
    """Guards the int8 bound above: scales 10% too large in one layer's fc1, or 2% in every layer, must break it
    (the honest model stays at 0.71 of it). (On these random fixtures int4's floor is as large as the logits, so
    its bound catches only gross errors; the exactness test and the format tests guard int4.)"""
    model = fixture_model("small16", dtype=torch.bfloat16).quantize("int8")
    honest = dense_twin(model)
    with torch.no_grad():
        if wrong == "one-layer":
            model.model.layers[3].mlp.fc1.scales.mul_(1.1)
        else:
            for m in model.modules():
                if isinstance(m, QuantLinear):
                    m.scales.mul_(1.02)
    _, inp, exp, _ = load_fixture("small16")
    ids, mask = inp["input_ids"], inp["attention_mask"]
    real = mask.bool()
    taps, ftaps = _run_with_taps(model, ids, mask), _run_with_taps(honest, ids, mask)
    assert any(rel_err(taps[k][real], exp[k][real]) > 2 * rel_err(ftaps[k][real], exp[k][real]) + BF16_EPS
               for k in taps if k.startswith(("hidden", "logits")))


# ---- decode, compile, training ----------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("weights, group_size", FORMATS)
def test_decode_of_a_quantized_model_equals_its_full_forward(spy, weights, group_size):
    """Prefill of 12 tokens (the twins), then one token per step (the CPU kernels), across window wraps."""
    model = random_model(seed=1, sliding_window=5).quantize(weights, group_size)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
        assert spy[f"linear_{weights}"] == 0  # 48 rows: the twins
        cache = model.allocate_cache(2, 24)
        steps = [model(ids[:, :12], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(12, 24)]
    n_quantized = len(model.config.quantization_config.modules)
    assert spy[f"linear_{weights}"] == 12 * n_quantized  # every step: each quantized linear once
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=FP32, atol=FP32 * full.abs().max().item())


@pytest.mark.slow  # ~13 s each: dynamo traces the prefill's decode step
@needs_kernels
@pytest.mark.parametrize("weights, group_size", FORMATS)
def test_generate_compiled_equals_eager_on_a_quantized_model(weights, group_size):
    """fullgraph tracing through the kernels' fake implementations: no graph break, one graph, the same tokens."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = random_model(sliding_window=5).quantize(weights, group_size)
    ids = torch.randint(0, 64, (2, 6))
    ref = model.generate(ids, max_new_tokens=9)
    assert torch.equal(model.generate(ids, max_new_tokens=9, compile="aot_eager"), ref)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_training_a_quantized_model_reaches_its_float_parameters_and_an_adapter():
    """The quantized buffers are constants; the loss's gradient reaches every remaining float parameter through them,
    and a LoRA-style adapter added beside a QuantLinear trains."""
    _, inp, _, _ = load_fixture("tiny8")
    ids = inp["input_ids"][:, :10]
    model = fixture_model("tiny8").quantize("int4", 32).train()
    fc1 = model.model.layers[2].mlp.fc1
    a = torch.nn.Parameter(torch.randn(64, 4) * 0.1)
    b = torch.nn.Parameter(torch.zeros(4, 256))
    fc1.register_forward_hook(lambda m, args, out: out + args[0] @ a @ b)
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters())
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(dict(model.named_parameters())[n].grad is not None for n in trained)
    with torch.no_grad():
        twin_loss = dense_twin(model.eval())(ids, labels=ids).loss  # without the adapter: b = 0 added nothing
    assert abs(loss.item() - twin_loss.item()) <= 1e-5 * twin_loss.item()


# ---- checkpoints ------------------------------------------------------------------------------------------------
def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("weights, group_size", FORMATS)
@pytest.mark.parametrize("shard", [None, 20_000])
def test_save_and_load_round_trip_bit_exactly(tmp_path, weights, group_size, shard):
    _, inp, _, _ = load_fixture("tiny8")
    ids = inp["input_ids"]
    model = fixture_model("tiny8", dtype=torch.bfloat16).quantize(weights, group_size)
    model.save_pretrained(tmp_path, **({} if shard is None else {"max_shard_size": shard}))
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "sambay", "format_version": 1, "weights": weights, "group_size": group_size,
                     "modules": sorted(model.config.quantization_config.modules)}
    stored = {}
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            stored.update({k: st.get_slice(k).get_dtype() for k in st.keys()})
    assert "lm_head.weight" not in stored and stored["model.embed_tokens.weight"] == "BF16"
    assert stored["lm_head.qweight"] == ("I8" if weights == "int8" else "U8")
    assert stored["lm_head.scales"] == ("F32" if weights == "int8" else "BF16")
    loaded = SambaYForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.quantization_config == model.config.quantization_config
    _same_state(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    loaded.save_pretrained(tmp_path / "again")  # a loaded quantized model saves the same file
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == set(stored)


def test_an_int8_weight_outside_the_symmetric_range_is_refused_by_name(tmp_path):
    """The int8 format is [-127, 127] (the integer kernels negate weights); -128 in a file is a foreign checkpoint."""
    model = fixture_model("tiny8", dtype=torch.bfloat16).quantize("int8")
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.fc2.qweight"][0, 3] = -128
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.fc2\.qweight.*\[-127, 127\].*found -128"):
        SambaYForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights, group_size", FORMATS)
def test_quantizing_while_loading_equals_quantizing_after(weights, group_size, dtype):
    loaded = SambaYForCausalLM.from_pretrained(FIXTURES / "small16", dtype=dtype, quantize=weights,
                                               group_size=group_size)
    after = fixture_model("small16", dtype=dtype).quantize(weights, group_size)
    assert loaded.config.quantization_config == after.config.quantization_config
    _same_state(loaded, after)
    ids = load_fixture("small16")[1]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, after(ids).logits)


def test_quantizing_while_loading_holds_one_dense_weight_at_a_time(monkeypatch):
    """Each dense weight read for a quantized module is dropped once quantized: whenever a weight is quantized, no
    earlier one is still alive (weak references to each; the tied embedding lives on as the embedding's parameter,
    a new tensor object)."""
    seen, alive_at_once = [], []
    real = QuantLinear.load_weight

    def load_weight(self, w):
        seen.append(weakref.ref(w))
        alive_at_once.append(sum(r() is not None for r in seen))
        real(self, w)

    monkeypatch.setattr(QuantLinear, "load_weight", load_weight)
    model = SambaYForCausalLM.from_pretrained(FIXTURES / "small16", quantize="int8")
    assert len(seen) == len(model.config.quantization_config.modules) == 75  # every linear of small16
    assert alive_at_once == [1] * 75 and not any(r() is not None for r in seen)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_peak_rss_of_quantizing_while_loading(tmp_path, weights):
    """A 338 MB bf16 checkpoint (D) quantized while loading, in a fresh process: the peak RSS growth exceeds the
    loaded model's bytes (Q: 228 MB int8, 149 MB int4) by at most a quarter of D; holding the dense model would
    add all of D. Measured over repeated runs: int8 Q + 20..58 MB, int4 Q + 27..29 MB: the reused read buffer (the
    largest dense linear, 7.3 MB), the quantization temporaries and the allocator's fragmentation, which varies
    with the heap layout from run to run (a bf16 load alone grows 1.02x D)."""
    write_random_checkpoint(tmp_path / "ckpt", _config(330))
    r = measure(tmp_path / "ckpt", quantize=weights)
    assert r["size"] > 300e6
    growth = r["peak"] - r["base"]
    assert growth <= r["model_bytes"] + 0.25 * r["size"], (growth, r)


def test_quantized_checkpoint_errors_name_what_was_found(tmp_path):
    model = fixture_model("tiny8").quantize("int8")
    model.save_pretrained(tmp_path / "q")
    d = tmp_path / "q"
    with pytest.raises(CheckpointError, match="already quantized \\(int8\\); quantize='int4'"):
        SambaYForCausalLM.from_pretrained(d, quantize="int4")
    assert SambaYForCausalLM.from_pretrained(d, quantize="int8").config.quantization_config.weights == "int8"
    with pytest.raises(ValueError, match="group_size: only with quantize='int4'"):
        SambaYForCausalLM.from_pretrained(FIXTURES / "tiny8", group_size=32)
    tensors = load_file(d / "model.safetensors")

    def variant(name, change):
        v = tmp_path / name
        shutil.copytree(d, v)
        t = dict(tensors)
        change(t)
        save_file(t, v / "model.safetensors")
        return v

    bad = variant("dtype", lambda t: t.update({"lm_head.qweight": t["lm_head.qweight"].view(torch.uint8)}))
    with pytest.raises(CheckpointError, match="tensor lm_head.qweight is stored as U8; expected I8"):
        SambaYForCausalLM.from_pretrained(bad)
    bad = variant("missing", lambda t: t.pop("model.layers.3.mlp.fc2.scales"))
    with pytest.raises(CheckpointError, match="missing: model.layers.3.mlp.fc2.scales \\(expected shape \\[64\\]\\)"):
        SambaYForCausalLM.from_pretrained(bad)
    bad = variant("dense", lambda t: t.update({"model.layers.0.mlp.fc1.weight": torch.zeros(256, 64)}))
    with pytest.raises(CheckpointError, match="unexpected: model.layers.0.mlp.fc1.weight"):
        SambaYForCausalLM.from_pretrained(bad)

    def nan_scale(t):
        t["model.layers.1.attn.Wqkv.scales"] = t["model.layers.1.attn.Wqkv.scales"].clone()
        t["model.layers.1.attn.Wqkv.scales"][3] = float("nan")

    bad = variant("nan", nan_scale)
    with pytest.raises(CheckpointError, match="model.layers.1.attn.Wqkv.scales \\(in model.safetensors\\): 1 NaN"):
        SambaYForCausalLM.from_pretrained(bad)
    assert SambaYForCausalLM.from_pretrained(bad, check_finite=False).lm_head.bits == 8


@pytest.mark.parametrize("quantization_config, words", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True},
     "quant_method 'bitsandbytes' is not a format sambay reads; it handles quant_method 'sambay', format_version 1"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "quant_method 'gptq' is not a format sambay reads"),
    ({"quant_method": "sambay", "format_version": 2, "weights": "int8"},
     "this sambay reads format_version 1, found 2"),
    ({"quant_method": "sambay", "format_version": 1, "weights": "int3", "group_size": None, "modules": ["lm_head"]},
     "weights: expected one of \\['int4', 'int8'\\], got 'int3'"),
    ({"quant_method": "sambay", "format_version": 1, "weights": "int4", "group_size": 48, "modules": ["lm_head"]},
     "group_size: int4 needs one of \\(32, 64, 128, 256\\), got 48"),
    ({"quant_method": "sambay", "format_version": 1, "weights": "int8", "group_size": None, "modules": ["x"],
      "bits": 8}, "expected the keys .*; unknown \\['bits'\\]"),
    ({"quant_method": "sambay", "format_version": 1, "weights": "int8", "group_size": None,
      "modules": ["model.layers.0.attn.conv1d"]}, "cannot quantize 1 module\\(s\\): model.layers.0.attn.conv1d "
     "\\(not a dense linear of this model\\)"),
    ({"quant_method": "sambay", "format_version": 1, "weights": "int4", "group_size": 32,
      "modules": ["model.layers.0.attn.dt_proj"]}, "dt_proj \\(in_features 4 not divisible by group_size 32\\)"),
])
def test_other_quantization_configs_are_refused_naming_them(tmp_path, quantization_config, words):
    shutil.copytree(FIXTURES / "tiny8", tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg, "quantization_config": quantization_config}))
    with pytest.raises(ValueError, match=words):
        SambaYForCausalLM.from_pretrained(tmp_path / "c")


def test_quantization_config_round_trips_through_its_dict():
    qc = QuantizationConfig("int4", 64, ("b", "a"))
    assert qc.modules == ("a", "b") and QuantizationConfig.from_dict(qc.to_dict()) == qc
    with pytest.raises(ValueError, match="distinct"):
        QuantizationConfig("int8", None, ("a", "a"))


def test_the_transformers_classes_load_save_and_quantize(tmp_path):
    """The remote-code path (modeling_sambay.py re-exports sambay's classes) loads a quantized checkpoint as
    quantized; the transformers class quantizes and saves like SambaYForCausalLM."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from sambay import hf

    _, inp, _, _ = load_fixture("tiny8")
    ids = inp["input_ids"]
    model = fixture_model("tiny8").quantize("int4", 32)
    model.save_pretrained(tmp_path / "q")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True)
    assert type(auto).__name__ == "Phi4FlashForCausalLM" and isinstance(auto.lm_head, QuantLinear)
    assert auto.config.quantization_config["weights"] == "int4"
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(auto(input_ids=ids).logits, ref)
    hf_model = hf.Phi4FlashForCausalLM.from_pretrained(FIXTURES / "tiny8").quantize("int4", 32)
    assert hf_model.sambay_config.quantization_config == model.config.quantization_config
    hf_model.save_pretrained(tmp_path / "hf")
    again = SambaYForCausalLM.from_pretrained(tmp_path / "hf")
    _same_state(again, model)
    loaded = hf.Phi4FlashForCausalLM.from_pretrained(FIXTURES / "tiny8", quantize="int4", group_size=32)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)


# ---- 8-bit activations (activations="int8") ------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("weights, group_size", FORMATS)
def test_decode_with_8bit_activations_equals_its_full_forward(spy, monkeypatch, weights, group_size):
    """The prefill takes the fake-quantize twins, each decode step the integer kernels: the same math per row."""
    calls = {"n": 0}
    real = getattr(torch.ops.sambay_cpu, f"linear_{weights}_a8")

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(torch.ops.sambay_cpu, f"linear_{weights}_a8", counted)
    model = random_model(seed=1, sliding_window=5).quantize(weights, group_size, activations="int8")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2, 16)
        steps = [model(ids[:, :8], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(8, 16)]
    assert calls["n"] == 8 * len(model.config.quantization_config.modules) and spy[f"linear_{weights}"] == 0
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=FP32, atol=FP32 * full.abs().max().item())


@pytest.mark.parametrize("weights, group_size", FORMATS)
@pytest.mark.parametrize("name", ["tiny8", "small16"])
def test_8bit_activations_track_the_weight_only_model_within_their_rounding_bound(name, weights, group_size):
    """8-bit activations round each input of a quantized linear by at most max|x_block| / 254 (2^-8 of its block's
    largest element); bf16 activations round each by 2^-9 of itself. So the bound is taken from the same weights
    run with bf16 compute: the A8 model (fp32 compute) may differ from the weight-only one by at most twice what bf16
    compute changes, plus 2^-8 (per layer, as rel_err over the real positions). Measured on these random fixtures:
    0.3-1.1x what bf16 changes (logits 7-29% of max |logit|, as bf16 compute on them). Where the weight-only
    model's top-1 margin exceeds twice the bound, the A8 model's argmax must agree."""
    _, inp, exp, _ = load_fixture(name)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    real = mask.bool()
    weight_only = _run_with_taps(fixture_model(name).quantize(weights, group_size), ids, mask)
    bf16 = _run_with_taps(fixture_model(name, dtype=torch.bfloat16).quantize(weights, group_size), ids, mask)
    a8 = _run_with_taps(fixture_model(name).quantize(weights, group_size, activations="int8"), ids, mask)
    for key in [f"hidden.{i}" for i in range(len([k for k in a8 if k.startswith("hidden.")]))] + ["logits"]:
        floor = rel_err(bf16[key][real], weight_only[key][real])
        err = rel_err(a8[key][real], weight_only[key][real])
        assert 0 < err <= 2 * floor + BF16_EPS, f"{key}: error {err:.3g} > 2 x {floor:.3g} + 2^-8"
    # the logits' bound as an absolute one, B = (2 floor + 2^-8) max |logit|, checked above
    wo, got, half = (t["logits"][real].double() for t in (weight_only, a8, bf16))
    bound = (2 * rel_err(half, wo) + BF16_EPS) * wo.abs().max()
    top2 = wo.topk(2, dim=-1).values
    decided = top2[:, 0] - top2[:, 1] > 2 * bound
    assert torch.equal(got.argmax(-1)[decided], wo.argmax(-1)[decided])
    # against the fp32 reference: the activation rounding adds to the weights' own error, within the same bound
    ref = exp["logits"][real].double()
    assert rel_err(got, ref) <= rel_err(wo, ref) + rel_err(half, wo) * 2 + BF16_EPS


def test_8bit_activations_save_load_and_switch(tmp_path):
    _, inp, _, _ = load_fixture("tiny8")
    ids = inp["input_ids"]
    model = fixture_model("tiny8", dtype=torch.bfloat16).quantize("int4", 32, activations="int8")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["activations"] == "int8" and saved["weights"] == "int4"
    loaded = SambaYForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.quantization_config == model.config.quantization_config
    assert all(m.activations == "int8" for m in loaded.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        weight_only = loaded.set_activations(None)(ids).logits
        assert loaded.config.quantization_config.activations is None
        assert not torch.equal(weight_only, model(ids).logits)
    # a weight-only checkpoint, or a float one quantized while loading, can be loaded with 8-bit activations
    loaded.save_pretrained(tmp_path / "wo")
    assert "activations" not in json.loads((tmp_path / "wo" / "config.json").read_text())["quantization_config"]
    again = SambaYForCausalLM.from_pretrained(tmp_path / "wo", activations="int8")
    direct = SambaYForCausalLM.from_pretrained(FIXTURES / "tiny8", dtype=torch.bfloat16, quantize="int4",
                                               group_size=32, activations="int8")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
        assert torch.equal(direct(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="only for quantized weights"):
        SambaYForCausalLM.from_pretrained(FIXTURES / "tiny8", activations="int8")
    with pytest.raises(ValueError, match="expected None \\(weight-only\\) or 'int8'"):
        fixture_model("tiny8").quantize("int8", activations="int4")


def test_training_through_8bit_activations_passes_the_gradient_straight_through():
    _, inp, _, _ = load_fixture("tiny8")
    ids = inp["input_ids"][:, :10]
    model = fixture_model("tiny8").quantize("int8", activations="int8").train()
    model(ids, labels=ids).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    first = next(m for m in model.modules() if isinstance(m, QuantLinear))
    assert first.activations == "int8" and model.model.embed_tokens.weight.grad.abs().sum() > 0  # through every a8
