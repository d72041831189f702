"""benchmarks/gpu_check.py runs end to end on a CPU (``--cpu --tiny``), so it is known to work before GPU time is
spent on it, and without ``--cpu`` it refuses a machine with no CUDA instead of silently timing the CPU."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch


ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_check(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_cpu_tiny_check_writes_every_measurement(tmp_path):
    output = tmp_path / "x.json"
    done = run_check("--cpu", "--tiny", "--output", str(output))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"wrote {output}" in done.stdout
    result = json.loads(output.read_text())

    assert result["device"] == "cpu" and result["device_type"] == "cpu" and result["dtype"] == "float32"
    assert result["tiny"] is True and result["weights"] == "random init"
    assert set(result["versions"]) >= {"torch", "transformers", "trl"}
    assert positive(result["total_seconds"])
    assert result["time_budget_s"] == {"limit": 600, "applies": False, "exceeded": result["total_seconds"] > 600}
    assert result["warnings"] == []  # the budget is a GPU budget
    settings = result["settings"]
    es_arm, grpo_arm = result["arms"]["es"], result["arms"]["grpo"]
    # the quickstart recipe's arms, shrunk
    assert es_arm["perturbation"] == "full" and es_arm["optim"] == "sgd" and es_arm["temperature"] == 0.0
    assert grpo_arm["temperature"] == 1.0 and grpo_arm["learning_rate"] == 6e-4

    sizes = result["sizes"]
    assert len(sizes) == 3
    parameters = [size["parameters"] for size in sizes]
    assert parameters == sorted(set(parameters)), parameters  # strictly increasing
    for index, size in enumerate(sizes):
        folder = pathlib.Path(size["model_dir"])
        assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()  # the no-hub path
        speed = size["throughput"]
        for variant in ("plain", "low_rank", "full"):
            assert positive(speed["seconds"][variant]) and positive(speed["rows_per_second"][variant])
            assert len(speed["seconds_all"][variant]) == settings["repeats"] >= 3
        assert positive(speed["low_rank_vs_plain"]) and positive(speed["full_vs_plain"])
        assert positive(speed["seconds"]["noise_draw_philox"]) and positive(speed["philox_noise_vs_torch"])
        memory = size["memory"]
        assert memory["measure"] == "ru_maxrss"
        assert positive(memory["es_mb"]) and positive(memory["grpo_mb"]) and positive(memory["es_over_grpo"])
        assert memory["es_over_grpo"] == pytest.approx(memory["es_mb"] / memory["grpo_mb"])
        for run in memory["runs"].values():
            assert run["steps"] == settings["memory_steps"] and run["accuracy_before"] is None
        # the train comparison runs on the smallest size only (without --train_all_sizes)
        assert (size["train"] is not None) == (index == 0)

    train = sizes[0]["train"]
    for kind, run in train.items():
        assert run["steps"] == settings["steps"]
        assert positive(run["seconds_per_step"]) and positive(run["rollouts_per_second"])
        assert positive(run["peak_memory_mb"])
        for key in ("accuracy_before", "accuracy_after"):
            assert 0.0 <= run[key] <= 1.0, (kind, key, run[key])
    # rollouts per step: ES population x distinct prompts (greedy: each generated once), GRPO its batch
    es_prompts = es_arm["per_device_train_batch_size"] // es_arm["num_generations"]
    assert train["es"]["rollouts"] == settings["steps"] * es_arm["population_size"] * es_prompts
    assert train["grpo"]["rollouts"] == settings["steps"] * grpo_arm["per_device_train_batch_size"]
    # the extra reward gives the members different fitness, so the ES update path runs too
    es_runs = [size["memory"]["runs"]["es"] for size in sizes] + [train["es"]]
    assert sum(run["steps_with_update"] for run in es_runs) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would start the real ten-minute check")
def test_without_cuda_the_check_asks_for_cpu(tmp_path):
    done = run_check("--tiny", "--output", str(tmp_path / "x.json"), timeout=300)
    assert done.returncode != 0
    assert "CUDA" in done.stderr and "--cpu" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "x.json").exists()
