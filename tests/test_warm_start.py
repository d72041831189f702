"""ESSA's warm start: the shipped LoRA adapter loads with plain peft, leaves ES room to improve, and its SVD space
starts bit-identical; the builder works end to end on a tiny model."""

import json

import pytest
import torch

from trl_es.core.noise import MemberNoise
from trl_es.core.svd import SVDSpace, svd_target_modules
from trl_es.tasks.arithmetic import ARITHMETIC_LORA_DIR, ARITHMETIC_POLICY_DIR


def load_adapted(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


def test_shipped_adapter_is_a_plain_peft_adapter_with_room_to_improve():
    assert sorted(p.name for p in ARITHMETIC_LORA_DIR.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "build_info.json",
    ]
    info = json.loads((ARITHMETIC_LORA_DIR / "build_info.json").read_text())
    shipped_policy = json.loads((ARITHMETIC_POLICY_DIR / "build_info.json").read_text())
    assert info["heldout_accuracy_base"] == shipped_policy["heldout_500_accuracy"]  # same 500 problems, same model
    assert info["heldout_accuracy_base"] < info["heldout_accuracy_base_plus_adapter"] < 0.8
    config = json.loads((ARITHMETIC_LORA_DIR / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] is None

    model = load_adapted(ARITHMETIC_POLICY_DIR, ARITHMETIC_LORA_DIR)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    space = SVDSpace(svd_target_modules(model), MemberNoise(0, 2))
    assert space.mode == "lora"
    assert space.search_dim == 4 * 4 * 2 * 2  # layers x q/k/v/o x (A, B) x ceil(0.5 * rank 4)
    space.set_vector(space.get_vector())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_builder_trains_saves_and_measures(tiny_model_dir, tmp_path):
    from benchmarks.build_policy import build_lora_adapter

    info = build_lora_adapter(tiny_model_dir, tmp_path, examples=16, rank=2, eval_size=8, command="test")
    saved = json.loads((tmp_path / "build_info.json").read_text())
    assert saved == info
    assert info["steps"] == 1 and info["lora_rank"] == 2 and info["heldout_problems"] == 8
    for key in ("heldout_accuracy_base", "heldout_accuracy_base_plus_adapter"):
        assert 0.0 <= info[key] <= 1.0
    assert not (tmp_path / "README.md").exists()
    model = load_adapted(tiny_model_dir, tmp_path)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 2 * 4 and any(p.abs().sum() > 0 for p in lora_b)  # trained: B left its zero init


def test_builder_trains_a_chat_adapter_and_records_the_base_it_fits(tiny_model_dir, tmp_path):
    """The conversational warm start (SmolLM2's, built on the real model) on the tiny policy's chat template: the
    SFT rows are user question -> assistant answer, and build_info pins the base weights' hash."""
    from benchmarks.build_policy import build_lora_adapter
    from trl_es.builtin_models import weights_sha256

    info = build_lora_adapter(
        tiny_model_dir, tmp_path, examples=16, rank=2, eval_size=4, command="test", task="chat_arithmetic"
    )
    assert info["task"] == "chat_arithmetic" and info["steps"] == 1 and info["heldout_problems"] == 4
    assert info["base_weights_sha256"] == weights_sha256(tiny_model_dir)
    model = load_adapted(tiny_model_dir, tmp_path)
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)


def test_builder_names_an_unknown_task(tiny_model_dir, tmp_path):
    from benchmarks.build_policy import build_lora_adapter

    with pytest.raises(ValueError, match="--lora_task must be one of .*'chat_arithmetic'.*, got 'sums'"):
        build_lora_adapter(tiny_model_dir, tmp_path, task="sums")
    assert not any(tmp_path.iterdir())


def test_a_shipped_builtin_whose_files_are_missing_is_named(monkeypatch, tmp_path):
    from trl_es import builtin_models

    monkeypatch.setitem(builtin_models.SHIPPED, "smollm2-chat-lora", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="builtin:smollm2-chat-lora's files are missing"):
        builtin_models.resolve_model("builtin:smollm2-chat-lora")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lora_rank", "0"], "--lora_rank must be >= 1, got 0"),
        (["--lora_examples", "0"], "--lora_examples must be >= 1, got 0"),
        (["--lora_learning_rate", "-1"], "--lora_learning_rate must be > 0, got -1.0"),
        (["--lora_examples", "6601"], r"--lora_examples must be <= 6600 \(the train problems before the validation"),
    ],
)
def test_builder_names_bad_arguments(argv, message, tmp_path):
    from benchmarks.build_policy import main

    with pytest.raises(ValueError, match=message):
        main(["--lora", *argv, "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
