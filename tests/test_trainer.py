"""ESTrainer end to end on a tiny local model: drop-in for GRPOTrainer, metrics, rewards, PEFT, data formats."""

import logging

import pytest
import torch
from conftest import assert_same_weights, es_config, length_reward, snapshot
from datasets import Dataset, IterableDataset
from trl import GRPOConfig, GRPOTrainer

from trl_es import ESConfig, ESTrainer
from trl_es.tasks import arithmetic_accuracy, arithmetic_dataset


def grpo_script(trainer_cls, model_dir, output_dir):
    """The body of a user's GRPO script; only `trainer_cls` differs between the two runs."""
    args = GRPOConfig(
        output_dir=str(output_dir),
        report_to="none",
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        learning_rate=1e-2,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=[length_reward, arithmetic_accuracy],
        args=args,
        train_dataset=arithmetic_dataset("train", size=64),
    )
    before = snapshot(trainer.model)
    trainer.train()
    return trainer, before


def test_same_grpo_script_runs_with_es_and_logs_grpo_metrics(tiny_model_dir, tmp_path):
    grpo, grpo_before = grpo_script(GRPOTrainer, tiny_model_dir, tmp_path / "grpo")
    es, es_before = grpo_script(ESTrainer, tiny_model_dir, tmp_path / "es")
    assert isinstance(es.args, ESConfig) and es.args.max_grad_norm == 0.0
    for name, param in es.model.named_parameters():
        assert not torch.equal(param.detach(), es_before[name]), f"ES left {name} unchanged"
    grpo_keys = {key for log in grpo.state.log_history for key in log}
    es_keys = {key for log in es.state.log_history for key in log}
    shared = {
        "reward",
        "reward_std",
        "rewards/length_reward/mean",
        "rewards/arithmetic_accuracy/std",
        "completions/mean_length",
        "num_tokens",
        "step_time",
        "learning_rate",
    }
    assert shared <= grpo_keys and shared <= es_keys
    assert {"es/fitness_std", "es/best_member_reward", "es/update_norm", "es/update_to_weight_ratio"} <= es_keys
    assert not any(key.startswith("eval_") for key in es_keys)


def test_num_tokens_counts_generated_tokens_of_every_member(tiny_model_dir, tmp_path):
    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=length_reward,
        args=es_config(tmp_path, max_steps=1, logging_steps=1),
        train_dataset=arithmetic_dataset("train", size=16),
    )
    trainer.train()
    log = trainer.state.log_history[0]
    prompt_tokens = 6  # "ab+cd=" is six byte tokens
    rows_per_member = 8  # 4 prompts x num_generations=2 (sampled, so every row is generated)
    expected = 4 * rows_per_member * (prompt_tokens + log["completions/mean_length"])
    assert log["num_tokens"] == pytest.approx(expected)


def test_greedy_members_generate_each_prompt_once_and_runs_are_reproducible(tiny_model_dir, tmp_path):
    def run(path, **overrides):
        trainer = ESTrainer(
            tiny_model_dir,
            reward_funcs=length_reward,
            args=es_config(path, **overrides),
            train_dataset=arithmetic_dataset("train", size=32),
        )
        trainer.train()
        return trainer

    greedy = run(tmp_path / "g", temperature=0.0)
    assert greedy.generation_config.do_sample is False
    # 4 distinct prompts per step, 4 members, 2 steps, 6 prompt tokens each (+ completion tokens)
    assert greedy.state.num_input_tokens_seen < 2 * 4 * 4 * (6 + 4) + 1

    first = run(tmp_path / "a", seed=3)
    second = run(tmp_path / "b", seed=3)
    for (name, p1), p2 in zip(first.model.named_parameters(), second.model.parameters()):
        assert torch.equal(p1, p2), f"sampled runs with one seed differ at {name}"
    third = run(tmp_path / "c", seed=4)
    assert not torch.equal(next(first.model.parameters()), next(third.model.parameters()))


async def async_length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_reward_function_kinds_weights_none_and_logging_hooks(tiny_model_dir, tmp_path):
    seen = {}

    def reward_with_hooks(prompts, completions, completion_ids, answer, trainer_state, log_extra, log_metric, **kw):
        seen["columns"] = {"answer": answer[:1], "step": trainer_state.global_step}
        log_extra("echo", [c[:1] for c in completions])
        log_metric("my_metric", 2.0)
        return [None if i % 2 else 1.0 for i in range(len(completions))]  # half unscorable

    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=[reward_with_hooks, async_length_reward],
        args=es_config(tmp_path, reward_weights=[1.0, 0.5], log_completions=True, logging_steps=1),
        train_dataset=arithmetic_dataset("train", size=16),
    )
    # reward_weights combine the functions as GRPO does; a completion no function scored stays unscorable (NaN).
    nan = float("nan")
    per_func = torch.tensor([[[1.0, 2.0], [nan, 4.0], [nan, nan]]])
    torch.testing.assert_close(
        trainer._combine_reward_funcs(per_func), torch.tensor([[2.0, 2.0, nan]]), equal_nan=True
    )
    trainer.train()
    keys = {key for log in trainer.state.log_history for key in log}
    assert "my_metric" in keys and "rewards/async_length_reward/mean" in keys
    assert seen["columns"]["answer"][0].isdigit()
    assert (tmp_path / "completions").is_dir()


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_logged_reward_is_grpos_weighted_raw_sum_under_every_aggregation(tiny_model_dir, tmp_path, aggregation):
    def one(completions, **kwargs):
        return [1.0] * len(completions)

    def point_four(completions, **kwargs):
        return [0.4] * len(completions)

    args = es_config(
        tmp_path, max_steps=1, logging_steps=1, reward_weights=[0.5, 0.5], multi_objective_aggregation=aggregation
    )
    trainer = ESTrainer(
        tiny_model_dir, reward_funcs=[one, point_four], args=args, train_dataset=arithmetic_dataset("train", size=16)
    )
    trainer.train()
    log = trainer.state.log_history[0]
    # What GRPOTrainer logs whatever the aggregation: the weighted sum of the raw rewards (0.5 * 1.0 + 0.5 * 0.4).
    assert log["reward"] == pytest.approx(0.7) and log["reward_std"] == pytest.approx(0.0, abs=1e-6)
    assert log["loss"] == pytest.approx(-0.7)  # ES's loss is the negative of the logged reward


def test_iterable_dataset_with_max_steps(tiny_model_dir, tmp_path):
    rows = arithmetic_dataset("train", size=40)
    stream = IterableDataset.from_generator(lambda: iter(rows))
    trainer = ESTrainer(
        tiny_model_dir, reward_funcs=length_reward, args=es_config(tmp_path, max_steps=3), train_dataset=stream
    )
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 3
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_conversational_dataset_with_trl_accuracy_reward(tiny_model_dir, tmp_path):
    from trl.rewards import accuracy_reward

    data = arithmetic_dataset("train", size=16, conversational=True)
    data = data.map(lambda row: {"solution": f"${row['answer']}$"})
    trainer = ESTrainer(tiny_model_dir, reward_funcs=accuracy_reward, args=es_config(tmp_path), train_dataset=data)
    before = snapshot(trainer.model)
    trainer.train()
    assert "rewards/accuracy_reward/mean" in trainer.state.log_history[0]
    # A random model never answers right: every member scores 0, so the fitness is flat and the update exactly zero.
    assert trainer.state.global_step == 2
    assert all(log["reward"] == 0.0 for log in trainer.state.log_history if "reward" in log)
    assert_same_weights(trainer.model, before)


def test_peft_evolves_only_the_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=length_reward,
        args=es_config(tmp_path),
        train_dataset=arithmetic_dataset("train", size=16),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.perturbation_name == "lora"
    before = snapshot(trainer.model)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)


def test_lora_space_without_peft_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="perturbation='lora'"):
        ESTrainer(
            tiny_model_dir,
            reward_funcs=length_reward,
            args=es_config(tmp_path, perturbation="lora"),
            train_dataset=arithmetic_dataset("train", size=16),
        )


def test_evaluate_scores_the_unperturbed_model_and_leaves_weights(tiny_model_dir, tmp_path):
    policy_dir = str(__import__("trl_es.tasks", fromlist=["x"]).ARITHMETIC_POLICY_DIR)
    test = arithmetic_dataset("test", size=40)
    trainer = ESTrainer(
        policy_dir,
        reward_funcs=arithmetic_accuracy,
        args=es_config(tmp_path, temperature=0.0, per_device_eval_batch_size=20, num_generations_eval=1),
        train_dataset=arithmetic_dataset("train", size=16),
        eval_dataset=test,
    )
    before = snapshot(trainer.model)
    metrics = trainer.evaluate()
    assert_same_weights(trainer.model, before)

    tokenizer = trainer.processing_class
    tokenizer.padding_side = "left"
    inputs = tokenizer(list(test["prompt"]), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = trainer.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    expected = sum(arithmetic_accuracy(texts, list(test["answer"]))) / len(test)
    assert metrics["eval_reward"] == pytest.approx(expected)
    assert metrics["eval_rewards/arithmetic_accuracy/mean"] == pytest.approx(expected)


def test_save_model_writes_hf_folder_and_es_model_card(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=length_reward,
        args=es_config(tmp_path, max_steps=1),
        train_dataset=arithmetic_dataset("train", size=16),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    trainer.create_model_card(model_name="tiny-es")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for (name, p1), p2 in zip(trainer.model.named_parameters(), reloaded.parameters()):
        assert torch.equal(p1, p2), name
    card = (tmp_path / "README.md").read_text()
    assert "ES (evolution strategies" in card


def test_default_args_and_grpo_conversion_log(tiny_model_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="trl_es.trainer"):
        trainer = ESTrainer(
            tiny_model_dir,
            reward_funcs=length_reward,
            args=GRPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, max_grad_norm=0.5),
            train_dataset=arithmetic_dataset("train", size=16),
        )
    assert sum("Converted GRPOConfig" in r.message for r in caplog.records) == 1
    assert trainer.args.max_grad_norm == 0.5  # explicitly set: kept (and warned about), not silently dropped
    default = ESTrainer(tiny_model_dir, reward_funcs=length_reward, train_dataset=Dataset.from_dict({"prompt": ["1"]}))
    assert isinstance(default.args, ESConfig)


def test_reward_model_given_as_a_local_path(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_config(config)
    reward_dir = tmp_path / "reward-model"
    reward_model.save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(reward_dir)
    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=[str(reward_dir), length_reward],
        args=es_config(tmp_path / "out", logging_steps=1),
        train_dataset=arithmetic_dataset("train", size=16),
    )
    before = snapshot(trainer.model)
    trainer.train()
    assert any(key.startswith("rewards/") and "reward-model" in key for key in trainer.state.log_history[0])
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_num_iterations_runs_that_many_es_steps_on_each_generation_batch(tiny_model_dir, tmp_path):
    seen = {}

    def record_prompts(prompts, completions, trainer_state, **kwargs):
        seen.setdefault(trainer_state.global_step, set()).update(prompts)
        return [float(len(c)) for c in completions]

    data = arithmetic_dataset("train", size=16)
    args = es_config(tmp_path, num_iterations=2, max_steps=-1, num_train_epochs=1)
    trainer = ESTrainer(tiny_model_dir, reward_funcs=record_prompts, args=args, train_dataset=data)
    assert trainer.args.num_iterations == 2
    trainer.train()
    # 16 prompts, 4 distinct per step, each batch used twice: 8 optimizer steps, as GRPO makes with these settings.
    grpo = GRPOTrainer(tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=data)
    assert trainer.state.global_step == len(grpo.get_train_dataloader()) == 8
    assert seen[0] == seen[1] and seen[2] == seen[3] and seen[0] != seen[2]


def test_steps_per_generation_gives_every_es_step_its_own_prompts_as_grpo_steps_have(tiny_model_dir, tmp_path):
    seen = {}

    def record_prompts(prompts, completions, trainer_state, **kwargs):
        seen.setdefault(trainer_state.global_step, set()).update(prompts)
        return [float(len(c)) for c in completions]

    data = arithmetic_dataset("train", size=16)
    settings = dict(steps_per_generation=2, max_steps=-1, num_train_epochs=1)
    with pytest.warns(UserWarning, match=r"ignores these GRPOConfig fields: steps_per_generation=2"):
        args = es_config(tmp_path, **settings)
    trainer = ESTrainer(tiny_model_dir, reward_funcs=record_prompts, args=args, train_dataset=data)
    trainer.train()
    # GRPO with the same settings: 4 optimizer steps, each on 4 prompts of its own (8 rows, 2 generations each)
    grpo_args = GRPOConfig(
        str(tmp_path / "grpo"),
        report_to="none",
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=2,
        **settings,
    )
    grpo = GRPOTrainer(tiny_model_dir, reward_funcs=length_reward, args=grpo_args, train_dataset=data)
    assert trainer.state.global_step == len(grpo.get_train_dataloader()) == 4
    assert [len(seen[step]) for step in range(4)] == [4, 4, 4, 4]
    assert set().union(*seen.values()) == set(data["prompt"])  # every prompt of the epoch, once


def test_philox_noise_off_the_compiled_kernel_is_named_in_a_warning(tiny_model_dir, tmp_path, caplog, monkeypatch):
    from trl_es.core import philox

    args = es_config(tmp_path, noise_generator="philox")
    with caplog.at_level(logging.WARNING, logger="trl_es.search"):
        ESTrainer(tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=arithmetic_dataset("train", 8))
    built = philox.kernel_status()[0]
    assert any("torch ops" in r.message for r in caplog.records) == (not built)
    caplog.clear()
    monkeypatch.setattr(philox, "kernel_status", lambda: (False, "no C compiler found (set CC or install gcc)"))
    with caplog.at_level(logging.WARNING, logger="trl_es.search"):
        trainer = ESTrainer(
            tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=arithmetic_dataset("train", 8)
        )
    assert trainer.perturbation_space.noise.counter_based
    assert any("no C compiler found" in r.message and "noise_generator='torch'" in r.message for r in caplog.records)
