"""ES variants inside ESTrainer: many directions on prompt groups, anchor decay, the sigma schedule, Adam-family
optimizers on the ES estimate, and the changed-completions diagnostic."""

import zlib

import pytest
import torch
from conftest import es_config, length_reward, snapshot

from trl_es import ESConfig, ESTrainer, trl_compat
from trl_es.core import seen_mask
from trl_es.tasks import arithmetic_dataset


def text_hash(completions, **kwargs):
    """A reward that tells any two completions apart (stable across processes, unlike hash())."""
    return [float(zlib.crc32(c.encode()) % 1000) for c in completions]


def make_trainer(model_dir, tmp_path, reward=length_reward, size=32, **overrides):
    return ESTrainer(
        model_dir,
        reward_funcs=reward,
        args=es_config(tmp_path, **overrides),
        train_dataset=arithmetic_dataset("train", size=size),
    )


def record_step(trainer, monkeypatch):
    """Record every ES step's `MemberResults` and how many rollouts GRPO's generation produced."""
    steps, rollouts = [], [0]
    evaluate, rollout = trainer._evaluate_members, trl_compat.rollout_with_tool_mask

    def recording_evaluate(step, batch):
        results, comm = evaluate(step, batch)
        steps.append(results)
        return results, comm

    def counting_rollout(self, prompts):
        rollouts[0] += len(prompts)
        return rollout(self, prompts)

    monkeypatch.setattr(trainer, "_evaluate_members", recording_evaluate)
    monkeypatch.setattr(trl_compat, "rollout_with_tool_mask", counting_rollout)
    return steps, rollouts


# 8 rows / 2 repeats, greedy: 4 distinct prompts per step; 4 members in 2 antithetic pairs
GREEDY = dict(temperature=0.0, per_device_train_batch_size=8, num_generations=2, population_size=4)


def test_prompt_groups_give_each_direction_group_only_its_prompts(tiny_model_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, tmp_path, reward=text_hash, prompt_groups=2, **GREEDY)
    steps, rollouts = record_step(trainer, monkeypatch)
    before = snapshot(trainer.model)
    trainer.train()
    assert len(steps) == 2
    for results in steps:
        seen = results.rewards_per_func[..., 0].isnan().logical_not()
        assert torch.equal(seen, seen_mask(4, 4, prompt_groups=2))  # members 0-1: prompts 0-1; 2-3: prompts 2-3
        assert [len(results.completions[m]) for m in range(4)] == [2, 2, 2, 2]
    assert rollouts[0] == 2 * 4 * 4 // 2  # steps x members x distinct prompts / prompt_groups
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("population_batch_size", [None, 1])
def test_low_rank_batched_members_on_different_prompts_match_the_one_group_run(
    tiny_model_dir, tmp_path, monkeypatch, population_batch_size
):
    """One batched forward serves all members although its member blocks hold different prompts: each member's greedy
    completions on its prompt group are those it produces when every member completes every prompt."""
    common = dict(GREEDY, perturbation="low_rank", max_steps=1, population_batch_size=population_batch_size)
    grouped = make_trainer(tiny_model_dir, tmp_path / "g", reward=text_hash, prompt_groups=2, **common)
    grouped_steps, _ = record_step(grouped, monkeypatch)
    grouped.train()
    whole = make_trainer(tiny_model_dir, tmp_path / "w", reward=text_hash, **common)
    whole_steps, _ = record_step(whole, monkeypatch)
    whole.train()
    seen = seen_mask(4, 4, prompt_groups=2)
    grouped_rewards, whole_rewards = grouped_steps[0].rewards_per_func[..., 0], whole_steps[0].rewards_per_func[..., 0]
    assert torch.equal(grouped_rewards[seen], whole_rewards[seen])
    assert grouped_rewards[~seen].isnan().all() and not whole_rewards.isnan().any()


def test_prompt_groups_that_split_the_population_unevenly_are_refused():
    with pytest.raises(ValueError, match=r"population_size=6 does not split into prompt_groups=4"):
        ESConfig("out", population_size=6, prompt_groups=4, bf16=False)
    with pytest.raises(ValueError, match="antithetic pairs .* must be evaluated on the same prompts"):
        ESConfig("out", population_size=12, prompt_groups=4, bf16=False)
    ESConfig("out", population_size=12, prompt_groups=4, antithetic=False, bf16=False)


def test_anchor_decay_pulls_toward_the_initial_weights(tiny_model_dir, tmp_path, monkeypatch):
    """Step 1 starts at theta_0 (no pull); from step 2 on the gradient holds anchor_decay * (theta - theta_0)."""
    trainer = make_trainer(tiny_model_dir, tmp_path, anchor_decay=0.5, max_steps=3)
    initial = snapshot(trainer.model)
    pulls = []
    add_pull = trainer.anchor.add_pull

    def recording_pull(named):
        # core.apply.apply_update adds the pull after the space wrote the ES pseudo-gradient, before clipping
        weights = {n: t.detach().clone() for n, t in named}
        es_grads = {n: t.grad.clone() for n, t in named}
        distance = add_pull(named)
        pulls.append((weights, es_grads, {n: t.grad.clone() for n, t in named}, distance))
        return distance

    monkeypatch.setattr(trainer.anchor, "add_pull", recording_pull)
    trainer.train()
    assert len(pulls) == 3
    for weights, es_grads, total, distance in pulls:
        squared = 0.0
        for name, weight in weights.items():
            torch.testing.assert_close(total[name], es_grads[name] + 0.5 * (weight - initial[name]))
            squared += float((weight - initial[name]).double().square().sum())
        assert distance == pytest.approx(squared**0.5)
    assert pulls[0][3] == 0.0 and pulls[2][3] > 0
    logged = [log["es/anchor_distance"] for log in trainer.state.log_history if "es/anchor_distance" in log]
    assert len(logged) == 3


def test_anchor_decay_and_sigma_decay_resume_bit_exactly(tiny_model_dir, tmp_path):
    def run(path, resume=None):
        trainer = make_trainer(
            tiny_model_dir,
            path,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            optim="adamw_torch",
            anchor_decay=0.3,
            sigma_decay=0.8,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    sigmas = [log["es/sigma"] for log in full.state.log_history if "es/sigma" in log]
    assert sigmas == pytest.approx([0.05 * 0.8**t for t in range(4)])
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"


def test_drift_fields_are_validated_by_name():
    with pytest.raises(ValueError, match=r"sigma_decay must be in \(0, 1\]"):
        ESConfig("out", sigma_decay=0.0, bf16=False)
    with pytest.raises(ValueError, match="anchor_decay must be finite and >= 0"):
        ESConfig("out", anchor_decay=-1.0, bf16=False)
    with pytest.raises(ValueError, match="anchor_decay=0.1 is read by strategy 'gaussian' only"):
        ESConfig("out", strategy="cma", perturbation="svd", anchor_decay=0.1, bf16=False)
    with pytest.raises(ValueError, match="log_frac_changed_completions compares greedy completions"):
        ESConfig("out", log_frac_changed_completions=True, temperature=1.0, bf16=False)


def test_adamw_on_the_es_estimate_trains_and_changes_the_weights(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, optim="adamw_torch", learning_rate=1e-3, weight_decay=0.01)
    before = snapshot(trainer.model)
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(len(optimizer.state[p]) for p in trainer.model.parameters())  # Adam moments for every weight
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    # Adam's first step moves every weight by ~lr (the sign of its gradient), whatever the ES estimate's scale
    step = max(float((p.detach() - before[n]).abs().max()) for n, p in trainer.model.named_parameters())
    assert 1e-4 < step < 1e-2


def test_frac_changed_completions_is_logged_and_costs_one_generation(tiny_model_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, tmp_path, log_frac_changed_completions=True, sigma=0.5, **GREEDY)
    steps, rollouts = record_step(trainer, monkeypatch)
    trainer.train()
    values = [
        log["es/frac_changed_completions"] for log in trainer.state.log_history if "es/frac_changed_completions" in log
    ]
    assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    assert rollouts[0] == 2 * (4 * 4 + 4)  # members x prompts, plus the unperturbed model's 4 prompts
    # a perturbation too small to flip any greedy token changes nothing
    quiet = make_trainer(
        tiny_model_dir, tmp_path / "q", log_frac_changed_completions=True, sigma=1e-9, max_steps=1, **GREEDY
    )
    quiet.train()
    assert [
        log["es/frac_changed_completions"] for log in quiet.state.log_history if "es/frac_changed_completions" in log
    ] == [0.0]


def test_anchor_decay_is_refused_by_name_under_zero3(tiny_model):
    """The anchor is a whole copy of the initial weights on every process; ZeRO-3 shards them."""
    from trl_es.core import MemberNoise
    from trl_es.search import Launch, build_space

    args = ESConfig("out", anchor_decay=0.1, perturbation="full", bf16=False)
    launch = Launch(deepspeed_config={"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="anchor_decay=0.1 needs a copy of the initial weights.*ZeRO-3"):
        build_space(tiny_model, args, MemberNoise(0, 4), launch)
