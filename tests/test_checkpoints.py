"""Complete checkpoints are found, ES settings and optimizer state are checked before a resume."""

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from trl_es import ESConfig
from trl_es.checkpoints import (
    ES_SETTINGS_NAME,
    TRAJECTORY_FIELDS,
    check_es_settings,
    check_optimizer_state,
    checkpoint_problems,
    last_complete_checkpoint,
    prepare_resume,
    save_es_settings,
)


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), report_to="none", bf16=False, population_size=4, sigma=0.05)
    values.update(overrides)
    return ESConfig(**values)


def optimizer_state(kind: str) -> dict:
    """A real optimizer's state dict after one step, two param groups as the Trainer builds (decay / no decay)."""
    weights, bias = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [weights], "weight_decay": 0.0}, {"params": [bias], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3) if kind == "adamw" else torch.optim.SGD(groups, lr=1e-3)
    weights.grad, bias.grad = torch.ones_like(weights), torch.ones_like(bias)
    optimizer.step()
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # what the LR scheduler adds
    return optimizer.state_dict()


def fake_checkpoint(output_dir, step: int, optimizer: str = "adamw", weights: str = "model.safetensors") -> str:
    """A checkpoint folder laid out as Trainer._save_checkpoint writes it (weights, optimizer, scheduler, RNG,
    state)."""
    folder = os.path.join(output_dir, f"checkpoint-{step}")
    os.makedirs(folder)
    tensors = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
    if weights.endswith(".safetensors"):
        save_file(tensors, os.path.join(folder, weights))
    else:
        torch.save(tensors, os.path.join(folder, weights))
    torch.save(optimizer_state(optimizer), os.path.join(folder, "optimizer.pt"))
    torch.save({"last_epoch": step}, os.path.join(folder, "scheduler.pt"))
    torch.save({"python": 0}, os.path.join(folder, "rng_state.pth"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as file:
        json.dump({"global_step": step, "log_history": []}, file)
    return folder


def truncate(path: str, keep: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as file:
        file.truncate(int(size * keep))


# ---------------------------------------------------------------------------------------------- completeness


def test_complete_fake_checkpoint_has_no_problems(tmp_path):
    assert checkpoint_problems(fake_checkpoint(tmp_path, 1)) == []
    assert checkpoint_problems(fake_checkpoint(tmp_path, 2, weights="adapter_model.safetensors")) == []
    assert checkpoint_problems(fake_checkpoint(tmp_path, 3, weights="pytorch_model.bin")) == []


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: os.remove(os.path.join(f, "trainer_state.json")), "no trainer_state.json"),
        (lambda f: truncate(os.path.join(f, "trainer_state.json")), "trainer_state.json is unreadable"),
        (lambda f: os.remove(os.path.join(f, "model.safetensors")), "no model weights"),
        (lambda f: truncate(os.path.join(f, "model.safetensors"), 0.9), "model.safetensors is truncated"),
        (lambda f: truncate(os.path.join(f, "model.safetensors"), 0.01), "model.safetensors is truncated"),
        (lambda f: truncate(os.path.join(f, "optimizer.pt"), 0.6), "optimizer.pt is truncated"),
        (lambda f: truncate(os.path.join(f, "rng_state.pth"), 0.6), "rng_state.pth is truncated"),
        (lambda f: open(os.path.join(f, ES_SETTINGS_NAME), "w").write("{"), "es_settings.json is unreadable"),
    ],
)
def test_damaged_checkpoint_is_partial_and_says_why(tmp_path, damage, message):
    folder = fake_checkpoint(tmp_path, 1)
    damage(folder)
    problems = checkpoint_problems(folder)
    assert any(message in problem for problem in problems), problems


@pytest.mark.parametrize("weights", ["model.safetensors", "adapter_model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_named_with_their_file(tmp_path, weights, bad):
    folder = fake_checkpoint(tmp_path, 1, weights=weights)
    path = os.path.join(folder, weights)
    size = os.path.getsize(path)
    tensors = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
    tensors["bias"][1] = bad
    save_file(tensors, path) if weights.endswith(".safetensors") else torch.save(tensors, path)
    assert os.path.getsize(path) == size  # what the completeness check alone cannot tell from a good file
    assert checkpoint_problems(folder) == [f"{weights} holds NaN or infinite values (in ['bias'])"]


def test_sharded_weights_need_every_shard(tmp_path):
    folder = fake_checkpoint(tmp_path, 1)
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"weight": "model-00001-of-00002.safetensors", "bias": "model-00002-of-00002.safetensors"}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as file:
        json.dump(index, file)
    assert checkpoint_problems(folder) == [
        "shard model-00002-of-00002.safetensors listed in model.safetensors.index.json is missing"
    ]
    save_file({"bias": torch.zeros(3)}, os.path.join(folder, "model-00002-of-00002.safetensors"))
    assert checkpoint_problems(folder) == []


def test_deepspeed_folder_counts_as_weights(tmp_path):
    folder = fake_checkpoint(tmp_path, 1)
    os.remove(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "latest"), "w") as file:
        file.write("global_step1")
    assert any("DeepSpeed folder 'global_step1'" in p for p in checkpoint_problems(folder))
    os.makedirs(os.path.join(folder, "global_step1"))
    open(os.path.join(folder, "global_step1", "mp_rank_00_model_states.pt"), "w").close()
    assert checkpoint_problems(folder) == []


def test_last_complete_checkpoint_skips_partial_folders_and_names_them(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 9)
    os.remove(os.path.join(fake_checkpoint(tmp_path, 10), "trainer_state.json"))  # killed mid-save
    truncate(os.path.join(fake_checkpoint(tmp_path, 11), "model.safetensors"))
    open(tmp_path / "checkpoint-12", "w").close()  # a file, not a checkpoint folder
    (tmp_path / "checkpoint-final").mkdir()  # not numbered
    with caplog.at_level(logging.WARNING, logger="trl_es.checkpoints"):
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-9")  # numeric, not text order
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2
    assert "checkpoint-11" in skipped[0] and "model.safetensors is truncated" in skipped[0]
    assert "checkpoint-10" in skipped[1] and "no trainer_state.json" in skipped[1]


def test_last_complete_checkpoint_none(tmp_path):
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    assert last_complete_checkpoint(str(tmp_path)) is None
    os.remove(os.path.join(fake_checkpoint(tmp_path, 1), "trainer_state.json"))
    assert last_complete_checkpoint(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------------- ES settings


def test_es_settings_round_trip(tmp_path):
    args = config(tmp_path, perturbation_target_modules=["q_proj", "v_proj"])
    folder = fake_checkpoint(tmp_path, 1)
    path = save_es_settings(folder, args, perturbation="full")
    saved = json.load(open(path))
    assert saved["format"] == 1 and set(saved["settings"]) == set(TRAJECTORY_FIELDS)
    assert saved["settings"]["optim"] == "sgd" and saved["settings"]["perturbation"] == "full"
    assert [name for name in os.listdir(folder) if ".tmp" in name] == []
    check_es_settings(folder, config(tmp_path, perturbation_target_modules=["q_proj", "v_proj"]), "full")
    assert checkpoint_problems(folder) == []


def test_changed_es_settings_are_all_named_with_both_values(tmp_path):
    folder = fake_checkpoint(tmp_path, 1)
    save_es_settings(folder, config(tmp_path))
    changed = config(tmp_path, population_size=8, sigma=0.1, fitness_shaping="zscore", learning_rate=0.5)
    with pytest.raises(ValueError) as info:
        check_es_settings(folder, changed)
    message = str(info.value)
    assert f"Cannot resume from {folder}" in message
    assert "population_size: checkpoint 4, now 8" in message
    assert "sigma: checkpoint 0.05, now 0.1" in message
    assert "fitness_shaping: checkpoint 'centered_rank', now 'zscore'" in message
    assert "learning_rate" not in message  # not trajectory-defining: the restored scheduler sets it
    check_es_settings(folder, config(tmp_path, population_size=8), ignore=("population_size",))


def test_optim_and_seed_are_checked(tmp_path):
    folder = fake_checkpoint(tmp_path, 1)
    save_es_settings(folder, config(tmp_path, optim="adamw_torch"))
    with pytest.raises(ValueError, match=r"seed: checkpoint 42, now 7; optim: checkpoint 'adamw_torch', now 'sgd'"):
        check_es_settings(folder, config(tmp_path, seed=7))


def test_auto_perturbation_matches_the_resolved_space(tmp_path):
    folder = fake_checkpoint(tmp_path, 1)
    save_es_settings(folder, config(tmp_path), perturbation="full")  # the trainer records the space it built
    check_es_settings(folder, config(tmp_path))  # 'auto' without a resolved space: not comparable, accepted
    check_es_settings(folder, config(tmp_path), perturbation="full")
    with pytest.raises(ValueError, match=r"perturbation: checkpoint 'full', now 'low_rank'"):
        check_es_settings(folder, config(tmp_path, perturbation="low_rank"), perturbation="low_rank")


def test_old_checkpoint_without_settings_warns_and_continues(tmp_path, caplog):
    folder = fake_checkpoint(tmp_path, 1)
    with caplog.at_level(logging.WARNING, logger="trl_es.checkpoints"):
        check_es_settings(folder, config(tmp_path, population_size=8))
    assert f"Checkpoint {folder} has no es_settings.json" in caplog.text


def test_unreadable_settings_are_an_error(tmp_path):
    folder = fake_checkpoint(tmp_path, 1)
    with open(os.path.join(folder, ES_SETTINGS_NAME), "w") as file:
        file.write('{"format": 1}')
    with pytest.raises(ValueError, match=rf"Checkpoint {folder}: es_settings.json is unreadable"):
        check_es_settings(folder, config(tmp_path))


# ---------------------------------------------------------------------------------------------- optimizer state


def test_adamw_state_with_sgd_is_named_instead_of_key_error(tmp_path):
    folder = fake_checkpoint(tmp_path, 1, optimizer="adamw")
    with pytest.raises(ValueError) as info:
        check_optimizer_state(folder, config(tmp_path, optim="sgd"))
    message = str(info.value)
    assert f"Cannot resume from {folder}: its optimizer.pt was saved by a different optimizer" in message
    assert "optim='sgd' (SGD), which needs the hyperparameter 'momentum'" in message
    assert "'betas'" in message and "'eps'" in message  # what the saved groups have instead
    check_optimizer_state(folder, "adamw_torch")  # by name, the matching optimizer passes


def test_sgd_state_with_adamw_is_named(tmp_path):
    folder = fake_checkpoint(tmp_path, 1, optimizer="sgd")
    with pytest.raises(ValueError, match=r"optim='adamw_torch' \(AdamW\), which needs the hyperparameter 'betas'"):
        check_optimizer_state(folder, "adamw_torch")
    check_optimizer_state(folder, config(tmp_path, optim="sgd"))


def test_checkpoint_without_optimizer_state_is_not_checked(tmp_path, caplog):
    folder = fake_checkpoint(tmp_path, 1)
    os.remove(os.path.join(folder, "optimizer.pt"))
    with caplog.at_level(logging.WARNING, logger="trl_es.checkpoints"):
        check_optimizer_state(folder, "sgd")
    assert "has no optimizer.pt: the optimizer restarts from scratch" in caplog.text


# ---------------------------------------------------------------------------------------------- prepare_resume


def test_prepare_resume(tmp_path):
    args = config(tmp_path, optim="adamw_torch")
    assert prepare_resume(None, args) is None and prepare_resume(False, args) is None
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True, but output_dir .* has no complete checkpoint"):
        prepare_resume(True, args)
    good = fake_checkpoint(tmp_path, 1)
    save_es_settings(good, args)
    partial = fake_checkpoint(tmp_path, 2)
    os.remove(os.path.join(partial, "trainer_state.json"))
    assert prepare_resume(True, args) == good
    assert prepare_resume(good, args) == good
    with pytest.raises(
        ValueError, match=rf"Cannot resume from {partial}: no trainer_state.json.*newest complete .*-1"
    ):
        prepare_resume(partial, args)
    with pytest.raises(ValueError, match=r"population_size: checkpoint 4, now 6"):
        prepare_resume(True, config(tmp_path, optim="adamw_torch", population_size=6))
    shutil.rmtree(good)
    with pytest.raises(ValueError, match=r"incomplete: \['checkpoint-2'\]"):
        prepare_resume(True, args)


# ---------------------------------------------------------------------------------------------- real checkpoints


def test_real_trainer_checkpoints(tiny_model_dir, tmp_path):
    from conftest import es_config, length_reward

    from trl_es import ESTrainer
    from trl_es.tasks import arithmetic_dataset

    args = es_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, optim="adamw_torch")
    trainer = ESTrainer(
        tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=arithmetic_dataset("train", size=32)
    )
    trainer.train()
    first, second = (str(tmp_path / f"checkpoint-{step}") for step in (1, 2))
    assert checkpoint_problems(first) == [] and checkpoint_problems(second) == []
    for folder in (first, second):  # what the trainer hook will do after each save
        save_es_settings(folder, args, trainer.perturbation_name)
    assert prepare_resume(True, args, trainer.perturbation_name) == second

    # The real Trainer state passes its own optimizer check and fails a different one by name.
    check_optimizer_state(second, args)
    with pytest.raises(ValueError, match=r"optim='sgd' \(SGD\), which needs the hyperparameter 'momentum'"):
        check_optimizer_state(second, es_config(tmp_path, optim="sgd"))
    with pytest.raises(ValueError, match=r"optim: checkpoint 'adamw_torch', now 'sgd'"):
        prepare_resume(second, es_config(tmp_path, optim="sgd"), trainer.perturbation_name)

    truncate(os.path.join(second, "model.safetensors"))  # killed while writing the weights
    assert last_complete_checkpoint(str(tmp_path)) == first


def test_resume_from_weights_holding_nan_names_the_file_or_falls_back_to_the_previous_checkpoint(
    tiny_model_dir, tmp_path, caplog
):
    from conftest import assert_same_weights, es_config, length_reward, snapshot
    from safetensors.torch import load_file

    from trl_es import ESTrainer
    from trl_es.tasks import arithmetic_dataset

    def trainer(path, **overrides):
        values = dict(max_steps=2, save_strategy="steps", save_steps=1, temperature=0.0)
        args = es_config(path, **{**values, **overrides})
        return ESTrainer(
            tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=arithmetic_dataset("train", size=32)
        )

    full = trainer(tmp_path)
    full.train()
    # checkpoint-2's weights turn to NaN on disk; the file keeps its size, so it still looks complete
    path = str(tmp_path / "checkpoint-2" / "model.safetensors")
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})

    resumed = trainer(tmp_path)
    before = snapshot(resumed.model)
    with pytest.raises(ValueError, match=rf"Cannot resume from .*checkpoint-2: model.safetensors holds NaN .*{name}"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_same_weights(resumed.model, before)

    # Automatic resume: checkpoint-2 is skipped, by name, and step 2 is trained again from checkpoint-1.
    with caplog.at_level(logging.WARNING, logger="trl_es.checkpoints"):
        resumed.train(resume_from_checkpoint=True)
    assert "checkpoint-2: model.safetensors holds NaN or infinite values" in caplog.text
    assert resumed.state.global_step == 2
    for (parameter, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), f"{parameter} differs from the uninterrupted run"


def test_trainer_resumes_past_a_partial_checkpoint_and_names_a_changed_optimizer(tiny_model_dir, tmp_path):
    """ESTrainer saves its settings with every checkpoint, and a resume skips a folder killed mid-save, refuses a
    changed optimizer by name, and stays bit-exact."""
    from conftest import es_config, length_reward

    from trl_es import ESTrainer
    from trl_es.tasks import arithmetic_dataset

    def trainer(path, **overrides):
        values = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch", temperature=1.0)
        args = es_config(path, **{**values, **overrides})
        return ESTrainer(
            tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=arithmetic_dataset("train", size=64)
        )

    full = trainer(tmp_path / "full")
    full.train()
    for step in (2, 4):
        settings = json.load(open(tmp_path / "full" / f"checkpoint-{step}" / ES_SETTINGS_NAME))["settings"]
        assert settings["perturbation"] == "full" and settings["optim"] == "adamw_torch"

    # The resumed run's output_dir holds checkpoint-2 and a checkpoint-4 killed before its trainer_state.json.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    for step in (2, 4):
        shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", resumed_dir / f"checkpoint-{step}")
    os.remove(resumed_dir / "checkpoint-4" / "trainer_state.json")

    with pytest.raises(ValueError, match=r"optim: checkpoint 'adamw_torch', now 'sgd'"):
        trainer(resumed_dir, optim="sgd").train(resume_from_checkpoint=True)

    resumed = trainer(resumed_dir)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), f"{name} differs after resume"
