"""Every shipped recipe parses and names its own command; `trl-es train` writes HF-style result files."""

import json
import pathlib

import pytest
import torch

from trl_es.cli import main
from trl_es.recipes import parse_train_args


RECIPES_DIR = pathlib.Path(__file__).parent.parent / "recipes"
# recipes/accelerate/ holds launcher configs (accelerate's format), not trl-es training recipes.
RECIPES = sorted(path for path in RECIPES_DIR.rglob("*.yaml") if path.parent.name != "accelerate")
ACCELERATE_CONFIGS = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))


def test_there_are_recipes():
    assert any(path.name == "quickstart.yaml" for path in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_starts_with_its_command(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and "trl-es " in first_line, f"{path.name}: first line must be the command"
    relative = path.relative_to(path.parent.parent if path.parent.name == "recipes" else path.parents[1])
    assert path.name in first_line, f"{path.name}: the command must name the recipe itself ({relative})"
    args = ["--config", str(path)]
    if path.parent.name == "gpu":
        # TrainingArguments rejects bf16 on a machine without a GPU; everything else is parsed as written.
        assert "GPU" in path.read_text().splitlines()[1]
        args += ["--bf16", "false"]
    script_args, es_args, model_args = parse_train_args(args)
    assert model_args.model_name_or_path and script_args.dataset_name and script_args.reward_funcs
    assert es_args.population_size >= 2 and es_args.sigma > 0


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses_and_starts_with_its_command(path):
    from accelerate.commands.config.config_args import ClusterConfig

    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith(
        f"# accelerate launch --config_file recipes/accelerate/{path.name} -m trl_es.cli train"
    )
    recipe = first_line.split("--config ")[-1].strip()
    assert (RECIPES_DIR.parent / recipe).is_file(), f"{path.name} launches a recipe that does not exist: {recipe}"
    config = ClusterConfig.from_yaml_file(path)  # accelerate's own loader: unknown keys are an error
    assert config.distributed_type.value == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == 3


def test_cli_train_writes_results(tmp_path):
    quickstart = next(path for path in RECIPES if path.name == "quickstart.yaml")
    overrides = {
        "--output_dir": str(tmp_path),
        "--max_steps": "2",
        "--population_size": "4",
        "--per_device_train_batch_size": "16",
        "--dataset_test_size": "40",
        "--per_device_eval_batch_size": "40",
        "--disable_tqdm": "true",
    }
    args = ["train", "--config", str(quickstart)] + [item for pair in overrides.items() for item in pair]
    assert main(args) == 0
    train = json.loads((tmp_path / "train_results.json").read_text())
    evaluation = json.loads((tmp_path / "eval_results.json").read_text())
    assert "train_runtime" in train
    assert 0.0 < evaluation["eval_accuracy_before"] < 1.0  # the shipped policy is partly right
    assert evaluation["eval_accuracy_after"] == evaluation["eval_accuracy"]
    assert evaluation["eval_accuracy_reward"] == "arithmetic_accuracy"
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()


def test_cli_usage_and_unknown_command(capsys):
    assert main([]) == 0
    assert "trl-es <command>" in capsys.readouterr().out
    assert main(["fly"]) == 2


def test_unknown_builtin_and_reward_names_are_clear(tmp_path):
    from trl_es.recipes import ESScriptArguments
    from trl_es.rewards import resolve_reward_func
    from trl_es.scripts.train import load_datasets, resolve_model

    with pytest.raises(ValueError, match="unknown built-in dataset 'builtin:nope'"):
        load_datasets(ESScriptArguments(dataset_name="builtin:nope"))
    with pytest.raises(ValueError, match="unknown built-in model"):
        resolve_model("builtin:nope")
    with pytest.raises(ValueError, match="module 'trl.rewards' has no attribute 'nope'"):
        resolve_reward_func("trl.rewards.nope")
    assert resolve_reward_func("accuracy_reward").__name__ == "accuracy_reward"
    assert resolve_reward_func("arithmetic_accuracy").__name__ == "arithmetic_accuracy"


def test_ctrl_c_during_train_saves_a_resumable_checkpoint_of_the_last_completed_step(tmp_path):
    from safetensors.torch import load_file

    from trl_es.checkpoints import last_complete_checkpoint

    quickstart = next(path for path in RECIPES if path.name == "quickstart.yaml")

    def run(output_dir, reward, max_steps):
        overrides = {
            "--output_dir": str(output_dir),
            "--reward_funcs": reward,
            "--max_steps": str(max_steps),
            "--population_size": "4",
            "--per_device_train_batch_size": "16",
            "--dataset_test_size": "8",
            "--per_device_eval_batch_size": "8",
            "--eval_before_training": "false",
            "--disable_tqdm": "true",
        }
        return main(["train", "--config", str(quickstart)] + [item for pair in overrides.items() for item in pair])

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "interrupted", "conftest.interrupt_on_the_second_step", 3)
    checkpoint = last_complete_checkpoint(str(tmp_path / "interrupted"))
    assert checkpoint is not None and checkpoint.endswith("checkpoint-1")
    assert run(tmp_path / "one_step", "conftest.completion_length", 1) == 0  # the same first step, uninterrupted
    saved = load_file(tmp_path / "interrupted" / "model.safetensors")
    reference = load_file(tmp_path / "one_step" / "model.safetensors")
    for name, tensor in reference.items():
        assert torch.equal(saved[name], tensor), f"{name}: the interrupted step left the weights changed"
