"""Bad input fails with an error naming the culprit, and the model's weights stay exactly as they were."""

import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_weights, es_config, length_reward, snapshot
from datasets import Dataset

from trl_es import ESConfig, ESTrainer
from trl_es.rewards import RewardFunctionError
from trl_es.tasks import arithmetic_dataset


def make_trainer(model_dir, tmp_path, reward_funcs, **overrides):
    return ESTrainer(
        model_dir,
        reward_funcs=reward_funcs,
        args=es_config(tmp_path, **overrides),
        train_dataset=arithmetic_dataset("train", size=16),
    )


def test_missing_prompt_column_is_named(tiny_model_dir, tmp_path):
    data = Dataset.from_dict({"question": ["1+1="], "answer": ["2"]})
    with pytest.raises(
        ValueError, match=r"train_dataset has no 'prompt' column \(columns: \['answer', 'question'\]\)"
    ):
        ESTrainer(tiny_model_dir, reward_funcs=length_reward, args=es_config(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="eval_dataset has no 'prompt' column"):
        ESTrainer(
            tiny_model_dir,
            reward_funcs=length_reward,
            args=es_config(tmp_path),
            train_dataset=arithmetic_dataset("train", size=4),
            eval_dataset=data,
        )


def exploding_reward(completions, **kwargs):
    raise KeyError("no such column")


def short_reward(completions, **kwargs):
    return [1.0]


def text_reward(completions, **kwargs):
    return ["good"] * len(completions)


def dict_reward(completions, **kwargs):
    return {f"completion {i}": 1.0 for i in range(len(completions))}


def nan_reward(completions, **kwargs):
    return [float("nan")] + [1.0] * (len(completions) - 1)


@pytest.mark.parametrize(
    "func, message",
    [
        (exploding_reward, r"Reward function 'exploding_reward' raised KeyError"),
        (short_reward, r"Reward function 'short_reward' returned 1 values for 8 completions"),
        (text_reward, r"Reward function 'text_reward' returned 'good' \(str\) for completion 0"),
        (dict_reward, r"Reward function 'dict_reward' returned a dict .*its keys would be read as the rewards"),
        (nan_reward, r"Reward function 'nan_reward' returned NaN for completion 0"),
    ],
)
def test_broken_reward_function_is_named_and_weights_survive(tiny_model_dir, tmp_path, func, message):
    trainer = make_trainer(tiny_model_dir, tmp_path, [length_reward, func])
    before = snapshot(trainer.model)
    with pytest.raises(RewardFunctionError, match=message):
        trainer.train()
    assert_same_weights(trainer.model, before)


def test_member_with_only_unscorable_completions_is_left_out(tiny_model_dir, tmp_path):
    calls = {"n": 0}

    def first_member_unscorable(completions, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the first reward call of the run scores member 0 of step 0
            return [None] * len(completions)
        return [float(len(c)) for c in completions]

    trainer = make_trainer(tiny_model_dir, tmp_path, first_member_unscorable, max_steps=1, logging_steps=1)
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.log_history[0]["es/invalid_members"] == 1.0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_step_without_any_scorable_completion_warns_skips_the_update_and_goes_on(tiny_model_dir, tmp_path, caplog):
    def none_on_the_first_step(completions, trainer_state, **kwargs):
        if trainer_state.global_step == 0:
            return [None] * len(completions)
        return [float(len(c)) for c in completions]

    trainer = make_trainer(tiny_model_dir, tmp_path, none_on_the_first_step, max_steps=1)
    before = snapshot(trainer.model)
    with caplog.at_level(logging.WARNING, logger="trl_es.trainer"):
        trainer.train()
    assert "every reward function (none_on_the_first_step) returned None" in caplog.text
    assert_same_weights(trainer.model, before)  # GRPO warns and goes on; ES makes no update on that step

    trainer = make_trainer(tiny_model_dir, tmp_path, none_on_the_first_step, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_image_column_is_refused_by_name(tiny_model_dir, tmp_path):
    data = Dataset.from_dict({"prompt": ["1+1="] * 4, "image": [None] * 4})
    with pytest.raises(ValueError, match="train_dataset has an 'image' column"):
        ESTrainer(tiny_model_dir, reward_funcs=length_reward, args=es_config(tmp_path), train_dataset=data)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("population_size", 1, "population_size must be >= 2"),
        ("population_size", 5, "population_size=5 is odd"),
        ("sigma", 0.0, "sigma must be > 0"),
        ("sigma", -1e-3, "sigma must be > 0"),
        ("fitness_shaping", "rank", "fitness_shaping='rank' is unknown"),
        ("perturbation", "dense", "perturbation='dense' is unknown"),
        ("temperature", -1.0, "temperature must be >= 0"),
    ],
)
def test_invalid_es_config_fields_are_named(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        ESConfig(output_dir=str(tmp_path), report_to="none", **{field: value})


def test_dataset_smaller_than_one_step_warns_with_the_count_and_the_limit(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match=r"train_dataset has 3 prompts, fewer than the 4 one ES step takes"):
        trainer = ESTrainer(
            tiny_model_dir,
            reward_funcs=length_reward,
            args=es_config(tmp_path, max_steps=2),
            train_dataset=arithmetic_dataset("train", size=3),
        )
    before = snapshot(trainer.model)
    trainer.train()  # as in GRPO: the sampler keeps only whole batches, so no step is made
    assert trainer.state.global_step == 0
    assert_same_weights(trainer.model, before)


def test_prompts_too_long_for_the_context_warn_once_with_the_count_and_the_limit(tiny_model_dir, tmp_path):
    import warnings

    long = "1+1=" * 40  # 160 tokens: past the tiny model's 128 positions
    prompts = [text for i in range(4) for text in (f"{long}{i}", f"{i}+{i}=")]
    args = es_config(tmp_path, max_steps=2, shuffle_dataset=False)  # step 0: two long prompts, two short ones
    trainer = ESTrainer(
        tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts})
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    found = [str(w.message) for w in record if "context" in str(w.message)]
    assert len(found) == 1, found  # once, though step 1 has long prompts too
    assert "ES step 0: 2 of its 4 prompts" in found[0] and "max_position_embeddings=128" in found[0]
    assert "at most 124 prompt tokens" in found[0] and "the longest has 161" in found[0]


def test_odd_population_is_fine_without_antithetic(tmp_path):
    assert (
        ESConfig(output_dir=str(tmp_path), report_to="none", population_size=5, antithetic=False).population_size == 5
    )


def test_policy_gradient_fields_warn_once(tmp_path):
    with pytest.warns(
        UserWarning, match=r"ignores these GRPOConfig fields: use_bias_correction_kl=False: .*loss_type='grpo'"
    ) as record:
        config = ESConfig(
            output_dir=str(tmp_path), report_to="none", beta=0.04, use_bias_correction_kl=False, loss_type="grpo"
        )
    messages = [str(w.message) for w in record if "ignores these" in str(w.message)]
    assert len(messages) == 1 and "beta=" not in messages[0]
    assert config.beta == 0.04  # honoured: a KL penalty on the fitness (trl_es.reference)


def test_hub_id_while_offline_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"Could not load model 'no-such-org/no-such-model'.*not a local folder"):
        ESTrainer(
            "no-such-org/no-such-model",
            reward_funcs=length_reward,
            args=es_config(tmp_path),
            train_dataset=arithmetic_dataset("train", size=4),
        )


def test_deepspeed_below_zero_stage_3_is_refused_with_a_reason(tiny_model_dir, tmp_path):
    # ZeRO-3 is supported (tests/test_zero3.py); stages 0-2 step only from their own backward hooks.
    # In a subprocess: a DeepSpeed config sets process-wide state (environment, accelerate singletons).
    pytest.importorskip("deepspeed")
    code = f"""
from conftest import es_config, length_reward
from trl_es import ESTrainer
from trl_es.tasks import arithmetic_dataset
config = {{"zero_optimization": {{"stage": 2}}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}}
try:
    ESTrainer({tiny_model_dir!r}, reward_funcs=length_reward, train_dataset=arithmetic_dataset("train", size=8),
              args=es_config({str(tmp_path)!r}, deepspeed=config, use_cpu=True))
except ValueError as error:
    print("REFUSED:", error)
"""
    tests_dir = pathlib.Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{tests_dir}{os.pathsep}{tests_dir.parent}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    expected = "REFUSED: ESTrainer supports DeepSpeed with ZeRO stage 3 only, got stage 2"
    assert expected in out.stdout, out.stderr[-2000:]


# inplace_update=None: plain SGD, so the update is applied from the seeds (no p.grad); False: through p.grad.
@pytest.mark.parametrize("inplace_update", [None, False])
def test_nonfinite_pseudo_gradient_is_refused_before_the_update(tiny_model_dir, tmp_path, inplace_update):
    def extreme(completions, **kwargs):  # finite rewards whose differences overflow float32 in the coefficients
        return [3e38 if len(c) % 2 else -3e38 for c in completions]

    trainer = make_trainer(
        tiny_model_dir, tmp_path, extreme, fitness_shaping="none", max_steps=1, inplace_update=inplace_update
    )
    before = snapshot(trainer.model)
    with pytest.raises(FloatingPointError, match="pseudo-gradient .*is NaN or infinite.*no update was made"):
        trainer.train()
    assert trainer._inplace_update == (inplace_update is None)
    assert_same_weights(trainer.model, before)


@pytest.mark.parametrize("inplace_update", [None, False])
def test_update_that_makes_weights_nonfinite_is_undone_and_named(tiny_model_dir, tmp_path, inplace_update):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, length_reward, learning_rate=1e38, max_steps=1, inplace_update=inplace_update
    )
    before = snapshot(trainer.model)
    with pytest.raises(FloatingPointError, match=r"learning_rate=1e\+38.*put back to those before the update"):
        trainer.train()
    assert_same_weights(trainer.model, before)


@pytest.mark.parametrize("inplace_update", [None, False])
def test_huge_finite_learning_rate_is_stopped_at_the_update_with_the_weights_put_back(
    tiny_model_dir, tmp_path, inplace_update
):
    # Finite weights of ~1e31 after the update: sampled decoding would then die one step later inside torch
    # ("probability tensor contains either inf, nan or element < 0") with the weights left there.
    trainer = make_trainer(
        tiny_model_dir, tmp_path, length_reward, learning_rate=1e30, max_steps=2, inplace_update=inplace_update
    )
    before = snapshot(trainer.model)
    with pytest.raises(FloatingPointError, match=r"ES step 0: the update .*learning_rate=1e\+30.*put back"):
        trainer.train()
    assert_same_weights(trainer.model, before)


def test_overflow_guard_refuses_only_what_the_update_pushed_past_the_bound(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, length_reward)
    (first, a), (second, b) = trainer.perturbation_space.named_tensors()[:2]
    with torch.no_grad():
        a.view(-1)[0] = 1e20  # the model arrived like this (beyond float32's 1.8e19): not the update's doing
        trainer._snapshot_weights()
        trainer._check_weights_usable()  # nothing raised
        trainer._snapshot_weights()
        b.view(-1)[0] = -1e20  # "the update" pushes this one past
        with pytest.raises(FloatingPointError, match=rf"the update pushed \['{second}'\] to magnitudes up to 1e\+20"):
            trainer._check_weights_usable()
    assert b.view(-1)[0] != -1e20 and a.view(-1)[0] == 1e20  # put back from the copy; the other left as it came


def test_member_generation_that_overflows_is_named_and_the_perturbation_undone(tiny_model_dir, tmp_path):
    # A perturbation too large for the weights: torch's sampler raises a bare RuntimeError inside generate.
    trainer = make_trainer(tiny_model_dir, tmp_path, length_reward, sigma=1e25, max_steps=1)
    before = snapshot(trainer.model)
    with pytest.raises(FloatingPointError, match=r"ES step 0: member\(s\) \[0\] .*inf/NaN.*sigma=1e\+25"):
        trainer.train()
    assert_same_weights(trainer.model, before)


def test_inplace_pseudo_gradient_that_overflows_midway_is_undone(tiny_model_dir, tmp_path, monkeypatch):
    # Finite coefficients whose weighted sum of noise overflows float32: found per tensor while applying, after the
    # tensors before it were updated; the copy kept for the update norm puts those back.
    trainer = make_trainer(tiny_model_dir, tmp_path, length_reward, max_steps=1)
    original = trainer.strategy.tell

    def huge(step, fitness):
        update = original(step, fitness)
        update.coefficients = torch.full_like(update.coefficients, 3e38)
        return update

    monkeypatch.setattr(trainer.strategy, "tell", huge)
    before = snapshot(trainer.model)
    with pytest.raises(FloatingPointError, match=r"pseudo-gradient of '.*' is NaN or infinite.*put back"):
        trainer.train()
    assert trainer._inplace_update
    assert_same_weights(trainer.model, before)


def test_ctrl_c_is_held_until_the_update_is_written():
    import signal

    from trl_es.guards import DeferredInterrupt

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job of a shell
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with DeferredInterrupt():
            os.kill(os.getpid(), signal.SIGINT)
            reached_end = True  # the interrupt did not cut the block short
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_during_the_update_finishes_the_step_so_the_weights_match_global_step(tiny_model_dir, tmp_path):
    import signal

    from safetensors.torch import load_file

    def run(path, max_steps):
        return make_trainer(
            tiny_model_dir, path, length_reward, max_steps=max_steps, lr_scheduler_type="constant", logging_steps=1
        )

    trainer = run(tmp_path / "interrupted", max_steps=3)
    space, after_update, pressed = trainer.perturbation_space, trainer.perturbation_space.after_update, []

    def ctrl_c_while_step_2_is_written():
        after_update()
        if trainer.state.global_step == 1 and not pressed:  # inside the update of step 2, Ctrl-C held
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    space.after_update = ctrl_c_while_step_2_is_written
    with pytest.raises(KeyboardInterrupt):
        try:
            trainer.train()
        except KeyboardInterrupt:
            trainer.save_model(str(tmp_path / "saved"))  # what a GRPO script's handler does
            raise
    assert pressed
    # The interrupted step was finished: its update, and its bookkeeping with it; then training stopped.
    assert trainer.state.global_step == 2 and trainer.lr_scheduler.last_epoch == 2
    assert [entry["step"] for entry in trainer.state.log_history if "reward" in entry] == [1, 2]
    uninterrupted = run(tmp_path / "two_steps", max_steps=2)
    uninterrupted.train()
    expected = uninterrupted.model.state_dict()
    for name, tensor in load_file(tmp_path / "saved" / "model.safetensors").items():
        assert torch.equal(tensor, expected[name]), f"{name}: the saved weights are not those of step 2"


def test_vllm_with_a_space_the_engine_cannot_see_is_refused_by_name(tiny_model_dir, tmp_path):
    # low_rank's members live in forward hooks on the trainer's model: a vLLM engine would generate every member as
    # the unperturbed model. Refused before any engine (or vLLM import) is involved.
    with pytest.raises(ValueError, match=r"use_vllm=True with perturbation='low_rank'.*forward hooks"):
        make_trainer(tiny_model_dir, tmp_path, length_reward, use_vllm=True, perturbation="low_rank")
