"""Tools, environments and Mixture-of-Experts models under ES, offline on tiny models.

The tiny models cannot call a tool on their own, so the first assistant turn is scripted: the model's ``generate``
returns a valid Qwen3-style tool call (the chat template GRPO knows how to parse), GRPO's own tool-calling loop runs
the tool, and the turn after the tool result is the real (perturbed) model's.
"""

import copy
import os
import random
import re

import pytest
import torch
from conftest import assert_same_weights, es_config, snapshot
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from trl import GRPOConfig, GRPOTrainer
from trl.chat_template_utils import qwen3_chat_template

from benchmarks.build_policy import build_tokenizer
from trl_es import ESTrainer, trl_compat
from trl_es.core import penalize_router_imbalance
from trl_es.router_balance import RouterBalance


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

POPULATION = 4


def tool_tokenizer():
    """The byte-level test tokenizer with Qwen3's chat template: GRPO then renders tools and parses tool calls."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = qwen3_chat_template
    return tokenizer


def tiny_model(tokenizer, seed=0):
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=2048,  # a prompt with a tool schema is ~1k byte tokens
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def script_tool_call(model, tokenizer, call: str, seen_prompts: list | None = None, answer_tokens: int = 3):
    """Make ``model.generate`` answer a first turn with ``call`` (+ EOS) and a post-tool turn with real tokens."""
    real_generate = model.generate
    forced = tokenizer(call, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def generate(input_ids, attention_mask=None, generation_config=None, **kwargs):
        texts = tokenizer.batch_decode(input_ids)
        if "<tool_response>" in texts[0]:
            config = copy.deepcopy(generation_config)
            config.max_new_tokens = answer_tokens
            return real_generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **kwargs
            )
        if seen_prompts is not None:
            seen_prompts.append(texts)
        return torch.cat([input_ids, torch.tensor([forced] * len(input_ids), device=input_ids.device)], dim=1)

    model.generate = generate


def tool_call(name: str, **arguments) -> str:
    import json

    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def final_answer_length(completions, **kwargs):
    return [float(len(completion[-1]["content"])) for completion in completions]


def tool_args(tmp_path, **overrides):
    values = dict(
        temperature=0.0,  # greedy: the repeats of a row must still all be generated (tools take part)
        population_size=POPULATION,
        per_device_train_batch_size=4,  # 2 prompts x num_generations=2
        max_completion_length=160,  # the scripted call, the tool result and the answer fit
        max_steps=1,
        logging_steps=1,
    )
    values.update(overrides)
    return es_config(tmp_path, **values)


# ---------------------------------------------------------------------- (a) a standalone tool


def test_a_tool_runs_once_per_member_rollout_and_training_finishes(tmp_path):
    tokenizer = tool_tokenizer()
    model = tiny_model(tokenizer)
    calls = []

    def multiply(a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        calls.append((a, b))
        return a * b

    script_tool_call(model, tokenizer, tool_call("multiply", a=3, b=4))
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i} times 4?"}] for i in range(4)]})
    trainer = ESTrainer(
        model,
        reward_funcs=final_answer_length,
        args=tool_args(tmp_path, max_steps=2),
        train_dataset=data,
        processing_class=tokenizer,
        tools=[multiply],
    )
    before = snapshot(model)
    trainer.train()
    rollouts_per_step = POPULATION * 4  # every member completes all 4 rows (repeats kept: tools take part)
    assert calls == [(3, 4)] * (2 * rollouts_per_step)
    logs = [log for log in trainer.state.log_history if "reward" in log]
    assert len(logs) == 2 and all(log["tools/call_frequency"] == 1.0 for log in logs)
    assert all(log["tools/failure_frequency"] == 0.0 for log in logs)
    # The post-tool turn is the perturbed model's, so members differ and the weights move.
    with pytest.raises(AssertionError):
        assert_same_weights(model, before)


def test_a_tool_trainer_checks_the_names_grpo_reads(tmp_path, monkeypatch):
    tokenizer = tool_tokenizer()

    def echo(text: str) -> str:
        """Echo the text.

        Args:
            text: What to echo.
        """
        return text

    trainer = ESTrainer(
        tiny_model(tokenizer),
        reward_funcs=final_answer_length,
        args=tool_args(tmp_path),
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]] * 4}),
        processing_class=tokenizer,
        tools=[echo],
    )
    trl_compat.check_trl_internals(trainer)
    monkeypatch.setitem(trl_compat.READ_BY_GENERATE, "_renamed_tool_dicts", "what GRPO reads now")
    with pytest.raises(RuntimeError, match=r"_renamed_tool_dicts .*no longer read by GRPO"):
        trl_compat.check_trl_internals(trainer)


# ---------------------------------------------------------------------- (b) environments


class Counter:
    """An environment with state: ``reset`` sets the counter from the row, the tool ``add`` changes it."""

    def __init__(self):
        self.value = None
        self.draw = None

    def reset(self, start: int = 0, **row):
        self.value = start
        self.draw = random.randint(0, 10**9)  # an episode drawn from the global RNG
        return f" Counter starts at {start}; episode {self.draw}."

    def add(self, amount: int) -> int:
        """Add to the counter.

        Args:
            amount: How much to add.
        """
        self.value += amount
        return self.value

    def get_reward(self) -> float:
        return float(self.value)


def test_environments_are_reset_fresh_for_every_member_and_score_its_rollouts(tmp_path):
    tokenizer = tool_tokenizer()
    model = tiny_model(tokenizer)
    seen_prompts, scored = [], []

    def counter_reward(environments, start, **kwargs):
        # Each rollout has its own instance, and the state is this block's: reset to `start`, then one `add(1)`.
        assert len({id(e) for e in environments}) == len(environments)
        scored.append([(e.value, s) for e, s in zip(environments, start, strict=True)])
        return [float(e.value == s + 1) for e, s in zip(environments, start, strict=True)]

    script_tool_call(model, tokenizer, tool_call("add", amount=1), seen_prompts)
    data = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "Count."}]] * 2, "start": [10, 20]},
    )
    trainer = ESTrainer(
        model,
        reward_funcs=counter_reward,
        args=tool_args(tmp_path, max_steps=2),
        train_dataset=data,
        processing_class=tokenizer,
        environment_factory=Counter,
    )
    trainer.train()
    # One block per member per step (the full space evaluates one member at a time), 4 rollouts each.
    assert len(scored) == len(seen_prompts) == 2 * POPULATION
    for block in scored:
        assert sorted(block) == [(11, 10), (11, 10), (21, 20), (21, 20)]
    # The pool holds one instance per rollout of a block, reused (reset again) by every later block.
    assert len(trainer._environment_pool[None]) == 4
    # The reset observation reached the prompts; the episodes drawn in `reset` are the same for every member of a
    # step (shared seeds per row), and differ between the repeats of a row and between steps.
    episodes = [[re.search(r"episode (\d+)", text).group(1) for text in block] for block in seen_prompts]
    steps = [episodes[:POPULATION], episodes[POPULATION:]]
    for step in steps:
        assert all(block == step[0] for block in step)
        assert len(set(step[0])) == 4
    assert steps[0][0] != steps[1][0]
    logs = [log for log in trainer.state.log_history if "reward" in log]
    assert all(log["rewards/counter_reward/mean"] == 1.0 for log in logs)
    # The environment-owned reward (`get_reward`, a reward column named after the class) scores the same instances.
    assert all(log["rewards/Counter/mean"] == pytest.approx(16.0) for log in logs)


# ---------------------------------------------------------------------- (c), (d) routing by the `environment` column


class Doubler(Counter):
    def reset(self, **row):
        super().reset(start=100, **row)


def routing_trainer(trainer_cls, args, environments: list[str], **kwargs):
    tokenizer = tool_tokenizer()
    model = tiny_model(tokenizer)
    script_tool_call(model, tokenizer, tool_call("add", amount=2))
    return trainer_cls(
        model,
        reward_funcs=lambda environments, **kw: [e.get_reward() for e in environments],
        args=args,
        train_dataset=Dataset.from_dict({"environment": environments}),
        processing_class=tokenizer,
        environment_factory={"counter": Counter, "doubler": Doubler},
        **kwargs,
    )


def test_an_unknown_environment_name_raises_grpos_error_and_leaves_the_weights(tmp_path):
    grpo_args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        report_to="none",
        bf16=False,
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=160,
        disable_tqdm=True,
        save_strategy="no",
    )
    names = ["counter", "nope"]
    with pytest.raises(ValueError) as grpo_error:
        routing_trainer(GRPOTrainer, grpo_args, names).train()
    trainer = routing_trainer(ESTrainer, tool_args(tmp_path / "es"), names)
    before = snapshot(trainer.model)
    with pytest.raises(ValueError) as es_error:
        trainer.train()
    assert str(es_error.value) == str(grpo_error.value)
    assert "Example has `environment='nope'`, which is not among the environments" in str(es_error.value)
    assert_same_weights(trainer.model, before)


def test_a_dataset_with_only_an_environment_column_trains_and_evaluates(tmp_path):
    trainer = routing_trainer(
        ESTrainer,
        tool_args(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4),
        ["counter", "doubler"],
        eval_dataset=Dataset.from_dict({"environment": ["doubler", "counter"]}),
    )
    trainer.train()
    log = next(log for log in trainer.state.log_history if "reward" in log)
    # Each row's environment starts at 0 (Counter) or 100 (Doubler, whose reset returns no observation: the
    # placeholder prompt), and its one add(2) is scored twice: by the user reward reading `environments` and by the
    # environment-owned reward column of its class (None for the other class's rows).
    assert log["rewards/Counter/mean"] == 2.0 and log["rewards/Doubler/mean"] == 102.0
    assert log["reward"] == pytest.approx((2 * 2 + 2 * 102) / 2)
    evaluation = next(log for log in trainer.state.log_history if "eval_reward" in log)
    assert evaluation["eval_reward"] == pytest.approx((2 * 2 + 2 * 102) / 2)


def test_without_a_dataset_the_environment_supplies_every_prompt(tmp_path):
    tokenizer = tool_tokenizer()
    model = tiny_model(tokenizer)
    seen_prompts = []
    script_tool_call(model, tokenizer, tool_call("add", amount=5), seen_prompts)
    trainer = ESTrainer(
        model,
        reward_funcs=lambda environments, **kw: [e.get_reward() for e in environments],
        args=tool_args(tmp_path),
        processing_class=tokenizer,
        environment_factory=Counter,
    )
    trainer.train()
    # GRPO's placeholder rows (empty user turns): every rollout's prompt is the reset observation.
    assert all("Counter starts at 0" in text for block in seen_prompts for text in block)
    assert next(log for log in trainer.state.log_history if "reward" in log)["reward"] == 2 * 5.0


# ---------------------------------------------------------------------- (e) Mixture of Experts


def tiny_moe(tokenizer, router_aux_loss_coef=0.001):
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        router_aux_loss_coef=router_aux_loss_coef,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config)


def moe_trainer(tmp_path, coef=None, **overrides):
    from trl_es.tasks import arithmetic_dataset

    tokenizer = build_tokenizer()
    values = dict(population_size=POPULATION, max_steps=1, logging_steps=1, router_aux_loss_coef=coef)
    values.update(overrides)
    return ESTrainer(
        tiny_moe(tokenizer),
        reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        args=es_config(tmp_path, **values),
        train_dataset=arithmetic_dataset("train", size=8),
        eval_dataset=arithmetic_dataset("test", size=4) if values.get("eval_strategy") else None,
        processing_class=tokenizer,
    )


def test_router_penalty_is_fitness_minus_coef_times_aux_loss():
    fitness = torch.tensor([1.0, 2.0, float("nan"), 0.5])
    aux = torch.tensor([0.5, float("nan"), 1.0, 2.0])
    penalized = penalize_router_imbalance(fitness, aux, coef=2.0)
    torch.testing.assert_close(penalized, torch.tensor([0.0, 2.0, float("nan"), -3.5]), equal_nan=True)
    with pytest.raises(ValueError, match=r"fitness \(4,\) and aux_loss \(3,\)"):
        penalize_router_imbalance(fitness, aux[:3], coef=1.0)


def record_fitness(trainer) -> list:
    told, aux = [], []
    tell, losses = trainer.strategy.tell, trainer.router_balance.losses

    def spy_tell(step, fitness):
        told.append(fitness.clone())
        return tell(step, fitness)

    def spy_losses(*args, **kwargs):
        aux.append(losses(*args, **kwargs))
        return aux[-1]

    trainer.strategy.tell = spy_tell
    trainer.router_balance.losses = spy_losses
    return told, aux


def test_moe_member_fitness_loses_coef_times_its_router_balance_loss(tmp_path):
    plain = moe_trainer(tmp_path / "plain", coef=0.0)  # 0 turns the term off, as in GRPO: no forward, no aux_loss
    penalized = moe_trainer(tmp_path / "penalized", coef=5.0)
    assert not plain.router_balance.enabled and penalized.router_balance.coef == 5.0
    (plain_fitness, _), (fitness, aux) = record_fitness(plain), record_fitness(penalized)
    plain.train()
    penalized.train()
    aux = torch.cat(aux)  # one measurement per member (one member per forward in the full space)
    assert aux.shape == (POPULATION,) and len(set(aux.tolist())) == POPULATION  # perturbations route differently
    torch.testing.assert_close(fitness[0], plain_fitness[0] - 5.0 * aux)
    log = penalized.state.log_history[0]
    assert log["aux_loss"] == pytest.approx(float(aux.mean()))
    assert "aux_loss" not in plain.state.log_history[0]


def test_moe_default_coef_logs_aux_loss_in_training_and_evaluation(tmp_path):
    trainer = moe_trainer(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
    assert trainer.router_balance.coef == pytest.approx(0.001)  # the config's own coefficient
    trainer.train()
    train_log = next(log for log in trainer.state.log_history if "reward" in log)
    eval_log = next(log for log in trainer.state.log_history if "eval_reward" in log)
    # The balance loss of top-2 routing over 4 experts is 2 when perfectly balanced, and larger otherwise.
    assert 1.9 < train_log["aux_loss"] < 4.0
    assert 1.9 < eval_log["eval_aux_loss"] < 4.0


def test_batched_members_get_their_own_balance_loss(tmp_path):
    tokenizer = build_tokenizer()
    model = tiny_moe(tokenizer)
    balance = RouterBalance(model, 0.01, POPULATION, members_per_forward=2, pad_token_id=tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200, (n,), generator=generator).tolist() for n in (5, 7, 6, 4)]
    completions = [torch.randint(0, 200, (n,), generator=generator).tolist() for n in (3, 1, 4, 2)]
    together = balance.losses(prompts, completions, num_members=2)
    alone = [balance.losses(prompts[i : i + 2], completions[i : i + 2]) for i in (0, 2)]
    torch.testing.assert_close(together, torch.cat(alone))
    assert together[0] != together[1]


def test_moe_trains_with_batched_low_rank_members(tmp_path):
    trainer = moe_trainer(tmp_path, coef=0.1, perturbation="low_rank")
    assert trainer.perturbation_space.members_per_forward == POPULATION
    told, aux = record_fitness(trainer)
    trainer.train()
    assert len(aux) == 1 and aux[0].shape == (POPULATION,) and len(set(aux[0].tolist())) == POPULATION
    assert "aux_loss" in trainer.state.log_history[0]
