"""Two real CPU processes (torchrun + gloo) give bit-identical weights to one process with the same global batch."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import free_port


WORKER = str(pathlib.Path(__file__).with_name("distributed_worker.py"))


def run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
# full: sampled decoding, every member generates alone, so the runs must match bit for bit.
# low_rank: greedy, because one sampling stream serves a whole batched member group and the grouping differs.
# svd: ESSA (CMA-ES over a LoRA's singular values), sampled decoding, one member per generate call: bit for bit.
# prompt_groups 2: the two member groups complete different halves of the prompts; with two processes a round's
# processes then generate different rows (low_rank: each process's one batched group is one prompt group).
@pytest.mark.parametrize(
    "perturbation, temperature, prompt_groups",
    [
        ("full", "1.0", "1"),
        ("low_rank", "0.0", "1"),
        ("svd", "1.0", "1"),
        ("full", "1.0", "2"),
        ("low_rank", "0.0", "2"),
    ],
)
def test_one_and_two_processes_give_identical_weights(
    tiny_model_dir, tmp_path, perturbation, temperature, prompt_groups
):
    one, two = tmp_path / "one", tmp_path / "two"
    # global batch 16 rows in both runs: 16 per device x 1 process, 8 per device x 2 processes
    run([sys.executable, WORKER, tiny_model_dir, str(one), "16", perturbation, temperature, prompt_groups], tmp_path)
    run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", free_port()]
        + [WORKER, tiny_model_dir, str(two), "8", perturbation, temperature, prompt_groups],
        tmp_path,
    )
    a, b = torch.load(one / "result.pt"), torch.load(two / "result.pt")
    assert a["world"] == 1 and b["world"] == 2
    changed = [name for name, w in a["weights"].items() if not torch.equal(w, b["weights"][name])]
    if perturbation in ("full", "svd"):
        assert not changed, f"1 vs 2 processes differ at {changed[:5]}"
    else:
        # low_rank batches 4 members per generate call on one process and 2 per call on each of two, so the
        # batched matmuls see different shapes; the weights agree to float rounding, not bit for bit.
        for name, w in a["weights"].items():
            torch.testing.assert_close(w, b["weights"][name], rtol=1e-4, atol=1e-5)
    comm = [log["es/comm_bytes"] for log in b["log"] if "es/comm_bytes" in log]
    assert comm and all(0 < c < 1e6 for c in comm)  # prompts and scalar rewards only: kilobytes, not weights
