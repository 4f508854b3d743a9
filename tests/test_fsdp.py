"""FSDP2 (torch.distributed.fsdp.fully_shard) on CPU: two gloo processes take one sharded training step,
which must equal one single-process step on the whole batch (loss and every updated weight)."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.distributed as dist
from helpers import fixture_model
from safetensors.torch import load_file, save_file

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

WORLD = 2
LR = 0.5
TIMEOUT_S = 50


def _batch() -> torch.Tensor:
    # Unpadded rows of equal length: the mean of the two ranks' mean losses is the whole batch's mean loss.
    return torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(11))


def _shard(model, mp_policy=None):
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def _step(model, ids) -> torch.Tensor:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.detach()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: shard the tiny8 fixture over 2 processes, take one SGD step on this rank's half of the
    batch, write the gathered weights and the global loss (rank 0)."""
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # k/v views; nothing in-place
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        local = _batch().chunk(WORLD)[rank]
        results = {}
        for name, checkpointing in (("plain", False), ("checkpointed", True)):
            model = _shard(fixture_model("tiny8").train())
            if checkpointing:
                model.gradient_checkpointing_enable()
            w = model.model.layers[0].mlp.fc1.weight
            assert type(w).__name__ == "DTensor" and w.to_local().shape[0] == w.shape[0] // WORLD
            loss = _step(model, local)
            dist.all_reduce(loss)
            results[f"{name}.loss"] = (loss / WORLD).reshape(1)
            for n, p in model.named_parameters():
                results[f"{name}.{n}"] = p.full_tensor().contiguous()
        # The documented bf16 recipe: fp32 master weights, bf16 compute (A_log, D, lambda are fp32 parameters,
        # so a bf16 model would mix dtypes inside one FSDP group, which FSDP2 rejects).
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = _shard(fixture_model("tiny8").train(), policy)
        loss = _step(model, local)
        dist.all_reduce(loss)
        results["bf16.loss"] = (loss / WORLD).reshape(1)
        if rank == 0:
            save_file(results, f"{out_dir}/result.safetensors")
    finally:
        dist.destroy_process_group()


def _run_workers(tmp_path) -> dict[str, torch.Tensor]:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} FSDP processes did not finish within {TIMEOUT_S} s")
    return load_file(tmp_path / "result.safetensors")


@pytest.mark.slow
def test_fsdp2_step_equals_single_process_step(tmp_path):
    got = _run_workers(tmp_path)

    torch.set_num_threads(1)
    ids = _batch()
    ref_model = fixture_model("tiny8").train()
    before = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref_loss = _step(ref_model, ids)
    after = dict(ref_model.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in before)  # the step moves every weight

    for name in ("plain", "checkpointed"):
        torch.testing.assert_close(got[f"{name}.loss"][0], ref_loss, rtol=1e-5, atol=0)
        names = sorted(k.removeprefix(f"{name}.") for k in got if k.startswith(f"{name}.") and k != f"{name}.loss")
        assert names == sorted(after)  # every parameter (the tied head once)
        for n in names:
            # the update is LR * grad: compare the weights' change, so that a wrong gradient cannot hide
            # behind the size of the weight itself
            delta, ref_delta = got[f"{name}.{n}"] - before[n], after[n].detach() - before[n]
            torch.testing.assert_close(delta, ref_delta, rtol=1e-4, atol=1e-5 * float(ref_delta.abs().max()),
                                       msg=lambda m, n=n, name=name: f"{name}: {n}: {m}")
    assert abs(got["bf16.loss"].item() - ref_loss.item()) < 0.02 * ref_loss.item()
