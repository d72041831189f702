"""Shared fixtures: a tiny Qwen2-style model and tokenizer built in a temp folder (no network, ~1 s)."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from benchmarks.build_policy import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, num_layers=2, intermediate_size=64, seed=0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def free_port() -> str:
    """A TCP port nothing listens on now: fixed ports collide with a previous test's socket still in TIME_WAIT."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def assert_same_weights(model, before: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]), f"{name} changed"


def length_reward(completions, **kwargs):
    return [float(len(c)) / 4 for c in completions]


def es_config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        report_to="none",
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=2,
        population_size=4,
        sigma=0.05,
        learning_rate=1e-3,
        max_completion_length=4,
        save_strategy="no",
        disable_tqdm=True,
        temperature=1.0,  # sampled completions: rewards differ between members even on a random tiny model
    )
    values.update(overrides)
    from trl_es import ESConfig

    return ESConfig(**values)


def completion_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def interrupt_on_the_second_step(completions, trainer_state, **kwargs):
    """``completion_length``, but it presses Ctrl-C in the middle of ES step 2 (after the first members ran)."""
    if trainer_state.global_step == 1:
        raise KeyboardInterrupt
    return completion_length(completions)


def tiny_compare_recipe(tmp_path, model_dir, grpo_extra=None, **extra):
    """A `trl-es compare` recipe on the tiny model: 16 ES rollouts and 8 GRPO rollouts a step, a 64-rollout budget
    (``extra`` replaces or adds top-level keys, e.g. ``compare=...``)."""
    import yaml

    recipe = {
        "model_name_or_path": model_dir,
        "dataset_name": "builtin:arithmetic",
        "dataset_train_size": 64,
        "dataset_test_size": 12,
        "reward_funcs": ["arithmetic_accuracy"],
        "seed": 3,
        "max_completion_length": 3,
        "per_device_eval_batch_size": 12,
        "bf16": False,
        # ES arm: 4 members x (8 rows / 2 repeats, greedy) = 16 rollouts per step
        "population_size": 4,
        "sigma": 0.05,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 8,
        "num_generations": 2,
        "temperature": 0.0,
        # GRPO arm: 8 rows = 8 rollouts per step
        "grpo": {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "num_generations": 4, **(grpo_extra or {})},
        "compare": {"budget_rollouts": 64, "eval_points": 2},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
