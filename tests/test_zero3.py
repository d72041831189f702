"""DeepSpeed ZeRO-3 on CPU: same weights as a plain run, exact restore, and 1 vs 2 processes.

Every DeepSpeed run is a subprocess (tests/zero3_worker.py): DeepSpeed sets process-wide state (environment,
accelerate singletons, its communication backend). The first ZeRO-3 run on a machine JIT-builds a CPU comm op
(~40-60 s); later runs take ~10 s each.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import free_port


pytest.importorskip("deepspeed")

WORKER = str(pathlib.Path(__file__).with_name("zero3_worker.py"))


def run(command, tmp_path, **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pathlib.Path(__file__).parent.parent), **env}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def run_single(tmp_path, model_dir, name, mode, temperature, port):
    out = tmp_path / name
    out.mkdir()
    # DeepSpeed needs a process group even for one process; without these variables it tries MPI discovery.
    single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    run([sys.executable, WORKER, model_dir, str(out), "16", mode, temperature], tmp_path, **single)
    return torch.load(out / "result_rank0.pt")


def differing(a, b):
    return [name for name, w in a["weights"].items() if not torch.equal(w, b["weights"][name])]


def check_perturb_restore(result):
    checks = result["perturb_restore"]
    # the small persistent parameters (always gathered by ZeRO-3) and the partitioned ones are both covered
    assert checks["persistent"] and len(checks["persistent"]) < len(result["weights"])
    assert checks["every_tensor_perturbed"], "a gathered weight missed the member's perturbation (stale copy)"
    assert checks["max_error_of_gathered_perturbation"] == 0.0
    assert checks["shards_restored_bitwise"] and checks["full_restored_bitwise"]


def test_zero3_single_process_matches_plain_run_bit_for_bit(tiny_model_dir, tmp_path):
    # Sampled decoding: one process generates every row either way, so even the sampling streams coincide.
    plain = run_single(tmp_path, tiny_model_dir, "plain", "plain", "1.0", free_port())
    zero3 = run_single(tmp_path, tiny_model_dir, "zero3", "zero3", "1.0", free_port())
    assert plain["space"] == "InPlaceSpace" and zero3["space"] == "ZeRO3Space"
    moved = [name for name, w in zero3["weights"].items() if not torch.equal(w, zero3["initial"][name])]
    assert len(moved) == len(zero3["weights"]), "ZeRO-3 ES left some weights unchanged"
    assert not differing(plain, zero3), f"ZeRO-3 and plain runs differ at {differing(plain, zero3)[:5]}"
    # one optimizer step per ES step, in the Trainer and in the engine
    assert zero3["global_step"] == plain["global_step"] == zero3["engine_steps"] == 3
    logged = [log for log in zero3["log"] if "es/update_norm" in log]
    plain_logged = [log for log in plain["log"] if "es/update_norm" in log]
    # The same pseudo-gradient; its norm is reduced in a different order/precision by DeepSpeed than by torch.
    assert [log["grad_norm"] for log in logged] == pytest.approx([log["grad_norm"] for log in plain_logged], rel=1e-6)
    for log in logged:  # plain SGD: the update is lr x pseudo-gradient
        assert log["es/update_norm"] == pytest.approx(log["learning_rate"] * log["grad_norm"], rel=1e-4)
    check_perturb_restore(zero3)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_zero3_two_processes_match_one_process(tiny_model_dir, tmp_path):
    # Greedy decoding: under ZeRO-3 the ranks evaluate the same member on different prompts, so with sampling each
    # rank would draw its own stream and the runs would agree only in distribution.
    one = run_single(tmp_path, tiny_model_dir, "one", "zero3", "0.0", free_port())
    two = tmp_path / "two"
    two.mkdir()
    run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", free_port()]
        + [WORKER, tiny_model_dir, str(two), "8", "zero3", "0.0"],
        tmp_path,
    )
    ranks = [torch.load(two / f"result_rank{rank}.pt") for rank in range(2)]
    assert one["world"] == 1 and ranks[0]["world"] == 2
    moved = [name for name, w in one["weights"].items() if not torch.equal(w, one["initial"][name])]
    assert moved, "greedy members all scored the same: the comparison would be vacuous"
    for result in ranks:
        assert not differing(one, result), f"1 vs 2 processes differ at {differing(one, result)[:5]}"
        assert result["global_step"] == result["engine_steps"] == 3
        check_perturb_restore(result)


def fake_zero3_param(full: torch.Tensor, rank: int, world: int, captured: dict) -> torch.nn.Parameter:
    """A stand-in for a ZeRO-3 parameter on ``rank`` of ``world``: an empty placeholder plus the padded flat shard."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partition = -(-full.numel() // world)  # ceil: DeepSpeed pads the flattened tensor to world x partition
    padded = torch.full((partition * world,), 777.0)  # sentinel padding: must never be touched
    padded[: full.numel()] = full.flatten()
    param = torch.nn.Parameter(torch.empty(0))
    param.ds_tensor = padded[rank * partition : (rank + 1) * partition].clone()
    param.ds_tensor.ds_numel = partition
    param.ds_numel, param.ds_shape, param.ds_id = full.numel(), full.shape, 0
    param.ds_process_group, param.ds_status = None, ZeroParamStatus.NOT_AVAILABLE

    class Optimizer:  # what deepspeed.utils.safe_set_local_grad writes to
        def set_local_grad_for_param(self, value, param):
            captured[rank] = value.clone()

    param._z3_optimizer = Optimizer()
    return param


@pytest.mark.parametrize("chunk_size", [2**20, 5])
def test_shards_with_padding_match_the_unsharded_space(monkeypatch, chunk_size):
    """Three ranks, a tensor of 35 elements (partitions of 12, the last one padded): every rank perturbs, restores and
    writes the gradient of exactly its slice of what the unsharded space does, and leaves the padding alone. With
    noise chunks of 5 elements the shards start and end inside chunks: each rank draws only the chunks it overlaps."""
    from deepspeed import comm

    from trl_es.core import InPlaceSpace, MemberNoise, pseudo_gradient_coefficients
    from trl_es.integrations.deepspeed import ZeRO3Space

    world, sigma, step, member = 3, 0.1, 4, 1
    full = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    noise = MemberNoise(seed=3, population_size=4, chunk_size=chunk_size)
    fitness = torch.tensor([0.5, -0.5, 0.25, -0.25])
    reference = torch.nn.Parameter(full.clone())
    plain = InPlaceSpace([("w", reference)], noise)
    with plain.perturbed(step, [member], sigma):
        perturbed = reference.detach().flatten().clone()
    plain.write_gradients(step, pseudo_gradient_coefficients(fitness, plain.noise, sigma))
    grads: dict[int, torch.Tensor] = {}
    monkeypatch.setattr(comm, "get_world_size", lambda group=None: 1)  # no all-reduce of the norm here
    for rank in range(world):
        monkeypatch.setattr(comm, "get_rank", lambda group=None, rank=rank: rank)
        param = fake_zero3_param(full, rank, world, grads)
        before = param.ds_tensor.clone()
        space = ZeRO3Space([("w", param)], noise, engine=lambda: None)
        start, partition = rank * param.ds_tensor.ds_numel, param.ds_tensor.ds_numel
        real = min(partition, full.numel() - start)
        with space.perturbed(step, [member], sigma):
            assert torch.equal(param.ds_tensor[:real], perturbed[start : start + real])
            assert torch.equal(param.ds_tensor[real:], before[real:])  # padding untouched
        assert torch.equal(param.ds_tensor, before)
        space.write_gradients(step, pseudo_gradient_coefficients(fitness, space.noise, sigma))
        assert torch.equal(grads[rank][real:], torch.zeros(partition - real))
    gathered = torch.cat([grads[rank] for rank in range(world)])[: full.numel()]
    assert torch.equal(gathered, reference.grad.flatten())
