"""KL to a reference under ES (GRPO's beta): honoured, logged as `kl`, the reference is the initial weights (or the
base model under PEFT), synced on GRPO's schedule, in checkpoints; GRPO builds no second model."""

import math
import warnings

import pytest
import torch
from conftest import es_config, length_reward, snapshot
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOConfig
from trl.trainer.callbacks import SyncRefModelCallback

import trl_es.trainer
from trl_es import ESConfig, ESTrainer
from trl_es.core import penalize_kl
from trl_es.reference import DisabledAdapter, FrozenCopy, completion_logps
from trl_es.tasks import arithmetic_dataset


def kl_trainer(model, path, peft_config=None, **overrides):
    values = dict(beta=0.5, seed=3) | overrides
    return ESTrainer(
        model,
        reward_funcs=length_reward,
        args=es_config(path, **values),
        train_dataset=arithmetic_dataset("train", size=16),
        peft_config=peft_config,
    )


def lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kwargs)


def test_grpo_config_with_beta_is_honoured_logged_and_builds_no_grpo_reference(tiny_model_dir, tmp_path):
    grpo = GRPOConfig(
        str(tmp_path),
        beta=0.1,
        report_to="none",
        bf16=False,
        max_steps=1,
        per_device_train_batch_size=8,
        num_generations=2,
        max_completion_length=4,
        save_strategy="no",
        disable_tqdm=True,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = ESTrainer(
            tiny_model_dir,
            reward_funcs=length_reward,
            args=grpo,
            train_dataset=arithmetic_dataset("train", size=8),
        )
    assert not [w for w in record if "ignores these GRPOConfig fields" in str(w.message)]
    assert trainer.args.beta == 0.1 and trainer.reference_kl.enabled
    # GRPO loaded no second model and registered no sync callback of its own; ref_model shows ES's reference
    assert {p.data_ptr() for p in trainer.ref_model.parameters()} == {
        t.data_ptr() for t in trainer.reference_kl.reference.tensors
    }
    assert not any(isinstance(c, SyncRefModelCallback) for c in trainer.callback_handler.callbacks)
    assert isinstance(trainer.reference_kl.reference, FrozenCopy)
    trainer.train()
    (logged,) = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert math.isfinite(logged) and logged > 0


def test_without_beta_nothing_is_measured_or_logged(tiny_model_dir, tmp_path):
    trainer = kl_trainer(tiny_model_dir, tmp_path, beta=0.0, max_steps=1)
    assert not trainer.reference_kl.enabled and trainer.reference_kl.reference is None
    trainer.train()
    assert not any("kl" in entry for entry in trainer.state.log_history)


def spy(monkeypatch, owner, name: str, keep) -> list:
    """Wrap ``owner.name``; every call appends ``keep(args, result)`` to the returned list."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(keep(args, result))
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_fitness_is_reward_minus_beta_kl_and_the_unperturbed_parent_has_zero_kl(tiny_model_dir, tmp_path, monkeypatch):
    # GA's member 0 is the unperturbed parent: at step 0 it is the reference itself, so its KL must be exactly 0
    # (the reference forward runs on the swapped-in copy of the very same weights); every child drifts.
    trainer = kl_trainer(tiny_model_dir, tmp_path, strategy="ga", population_size=6, max_steps=1)
    raw = spy(monkeypatch, trl_es.trainer, "member_fitness", lambda args, result: result)
    kls = spy(monkeypatch, trainer.reference_kl, "member_kl", lambda args, result: result)
    told = spy(monkeypatch, trainer.strategy, "tell", lambda args, result: args[1].clone())
    trainer.train()
    (kl,), (fitness,) = kls, told
    assert kl[0] == 0.0 and (kl[1:] > 0).all()
    assert torch.equal(fitness, penalize_kl(raw[0], kl, 0.5))
    (logged,) = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert logged == pytest.approx(float(kl.mean()))


def test_completion_logps_match_unpadded_forwards(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts, completions = [[5, 6, 7], [8], [9, 10]], [[11, 12], [13, 14, 15], []]
    tool_mask = [[1, 0], [1, 1, 1], []]
    logps, mask = completion_logps(model, prompts, completions, tool_mask, 1, pad_token_id=0, temperature=2.0)
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        if not completion:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1] / 2.0
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(logps[row, : len(completion)], expected, rtol=1e-5, atol=1e-5)


def test_reference_forward_sees_the_initial_weights_and_gives_the_policy_back_exactly(tiny_model_dir, tmp_path):
    initial = snapshot(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    trainer = kl_trainer(tiny_model_dir, tmp_path, max_steps=2)
    trainer.train()
    trained = snapshot(trainer.model)
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)
    with trainer.reference_kl.reference.active():
        for name, param in trainer.model.named_parameters():
            assert torch.equal(param, initial[name]), name
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, trained[name]), f"{name} not given back"


class RecordReference(TrainerCallback):
    """The reference and the policy at the end of every optimizer step (after ReferenceKL's sync, added first)."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        reference = [t.clone() for t in self.trainer.reference_kl.reference.tensors]
        policy = [t.detach().clone() for t in self.trainer.perturbation_space.local_tensors()]
        self.steps.append((state.global_step, reference, policy))


def test_sync_ref_model_mixes_the_reference_on_schedule(tiny_model_dir, tmp_path):
    trainer = kl_trainer(
        tiny_model_dir, tmp_path, max_steps=4, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.25
    )
    initial = [t.clone() for t in trainer.reference_kl.reference.tensors]
    recorder = RecordReference(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert [step for step, _, _ in recorder.steps] == [1, 2, 3, 4]
    expected = initial
    for step, reference, policy in recorder.steps:
        if step % 2 == 0:  # TR-DPO: reference <- alpha * policy + (1 - alpha) * reference, every 2 steps
            expected = [r.clone().mul_(0.75).add_(p, alpha=0.25) for r, p in zip(expected, policy)]
        assert all(torch.equal(r, e) for r, e in zip(reference, expected)), f"step {step}"
    assert not all(torch.equal(r, i) for r, i in zip(expected, initial))


def test_ref_model_is_the_reference_a_grpo_script_reads(tiny_model_dir, tmp_path):
    # TRL's own test_training_with_sync_ref_model against ESTrainer: ref_model exists with beta > 0, syncing moves it
    trainer = kl_trainer(tiny_model_dir, tmp_path, max_steps=2, sync_ref_model=True, ref_model_sync_steps=2)
    ref_model = trainer.ref_model
    assert ref_model is not None and trainer.ref_model is ref_model
    assert not ref_model.training and not any(p.requires_grad for p in ref_model.parameters())
    previous_params = snapshot(trainer.model)
    previous_ref_params = {n: p.clone() for n, p in ref_model.named_parameters()}
    assert previous_ref_params.keys() == previous_params.keys()
    # No second model in memory: the evolved tensors are the reference's own copy, kept by trainer.reference_kl.
    reference = trainer.reference_kl.reference.tensors
    assert {p.data_ptr() for p in ref_model.parameters()} == {t.data_ptr() for t in reference}
    trainer.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), trainer.reference_kl.reference.active():
        expected = trainer.model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(ref_model(ids).logits, expected, rtol=0, atol=0)
        assert not torch.equal(trainer.model(ids).logits, expected)
    for name, before in previous_params.items():
        assert not torch.equal(trainer.model.get_parameter(name), before), f"{name} has not changed"
        assert not torch.equal(ref_model.get_parameter(name), previous_ref_params[name]), f"ref {name} not synced"


def test_ref_model_is_none_without_beta_or_with_peft_as_in_grpo(tiny_model_dir, tmp_path, caplog):
    assert kl_trainer(tiny_model_dir, tmp_path / "no_beta", beta=0.0).ref_model is None
    assert kl_trainer(tiny_model_dir, tmp_path / "peft", peft_config=lora()).ref_model is None  # the adapter disabled
    # svd: the reference is a copy of singular values, no model of its own; said once, not silently
    svd = kl_trainer(tiny_model_dir, tmp_path / "svd", perturbation="svd")
    with caplog.at_level("WARNING", logger="trl_es.reference"):
        assert svd.ref_model is None and svd.ref_model is None
    assert caplog.text.count("trainer.ref_model is None: the SVDSpace space") == 1
    # A model assigned to ref_model would never be used (ES's reference is trainer.reference_kl): refused by name.
    with pytest.raises(AttributeError, match="ESTrainer.ref_model cannot be replaced"):
        svd.ref_model = torch.nn.Linear(1, 1)


def test_sync_ref_model_without_beta_warns_that_there_is_nothing_to_sync_and_runs(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match=r"sync_ref_model=True with beta=0.0: .*nothing to synchronize"):
        trainer = kl_trainer(tiny_model_dir, tmp_path, beta=0.0, sync_ref_model=True, max_steps=1)
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.ref_model is None
    assert not any("kl" in entry for entry in trainer.state.log_history)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_ctrl_c_while_the_reference_is_swapped_in_leaves_the_policy_in_place(tiny_model_dir, tmp_path, monkeypatch):
    import os
    import signal

    from conftest import assert_same_weights

    trainer = kl_trainer(tiny_model_dir, tmp_path)
    reference, space = trainer.reference_kl.reference, trainer.perturbation_space
    for tensor in reference.tensors:
        tensor.add_(1.0)  # a reference that differs from the policy
    before = snapshot(trainer.model)
    local_tensors, calls = space.local_tensors, []

    def ctrl_c_during_the_first_swap():
        calls.append(True)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # held until the swap is whole
        return local_tensors()

    monkeypatch.setattr(space, "local_tensors", ctrl_c_during_the_first_swap)
    with pytest.raises(KeyboardInterrupt):
        with reference.active():
            pytest.fail("the interrupt is raised as soon as the swap is whole")
    assert_same_weights(trainer.model, before)  # swapped back, not left acting as the reference


def test_resume_with_a_synced_reference_is_bit_exact(tiny_model_dir, tmp_path):
    def run(path, **overrides):
        values = dict(max_steps=4, sync_ref_model=True, ref_model_sync_steps=1, optim="adamw_torch") | overrides
        return kl_trainer(tiny_model_dir, path, **values)

    full = run(tmp_path / "full", save_strategy="steps", save_steps=2)
    full.train()
    assert (tmp_path / "full" / "checkpoint-2" / "es_state.pt").is_file()  # the moved reference is saved
    resumed = run(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"
    for a, b in zip(full.reference_kl.reference.tensors, resumed.reference_kl.reference.tensors, strict=True):
        assert torch.equal(a, b)


def test_peft_reference_is_the_base_model_or_a_copy_of_an_adapter_the_model_arrived_with(tiny_model_dir, tmp_path):
    from peft import get_peft_model

    fresh = kl_trainer(tiny_model_dir, tmp_path / "fresh", peft_config=lora(), max_steps=1)
    assert isinstance(fresh.reference_kl.reference, DisabledAdapter)
    fresh.train()
    assert any("kl" in entry for entry in fresh.state.log_history)
    synced = kl_trainer(tiny_model_dir, tmp_path / "synced", peft_config=lora(), sync_ref_model=True)
    assert isinstance(synced.reference_kl.reference, FrozenCopy)
    assert all("lora_" in name for name, _ in synced.perturbation_space.named_tensors())
    # a model with a trained adapter: GRPO's reference is a copy of that adapter, not the base model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    warm = kl_trainer(get_peft_model(base, lora(init_lora_weights=False)), tmp_path / "warm")
    assert isinstance(warm.reference_kl.reference, FrozenCopy)


def test_disabled_adapter_reference_is_the_base_model(tiny_model_dir, tmp_path):
    trainer = kl_trainer(tiny_model_dir, tmp_path, peft_config=lora(init_lora_weights=False))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        adapted = trainer.model(ids).logits
        with trainer.reference_kl.reference.active():
            reference = trainer.model(ids).logits
        expected = base(ids).logits
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(adapted, expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(beta=-0.1), r"beta must be >= 0"),
        (dict(beta=0.1, ref_model_sync_steps=0), r"ref_model_sync_steps must be an integer >= 1, got 0"),
        (dict(beta=0.1, ref_model_mixup_alpha=1.5), r"ref_model_mixup_alpha must be in \[0, 1\]"),
        (dict(beta=float("nan")), r"ESConfig.beta must be finite"),
    ],
)
def test_bad_kl_settings_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ESConfig(str(tmp_path), report_to="none", bf16=False, **overrides)


def test_batched_members_are_measured_each_under_its_own_perturbation(tiny_model_dir, tmp_path, monkeypatch):
    import trl_es.reference

    monkeypatch.setattr(trl_es.reference, "LOGITS_BYTES_PER_FORWARD", 1)  # 1 row per member per forward: 2 forwards
    trainer = kl_trainer(tiny_model_dir, tmp_path, perturbation="low_rank", population_size=4, max_steps=1)
    space, model = trainer.perturbation_space, trainer.model
    prompts = [[5, 6, 7], [8, 9]] * 4  # member-major: 4 blocks of the same 2 prompts
    # each member's own completions, of differing lengths
    completions = [row for m in range(4) for row in ([10 + m, 11], [12, 13 + m, 14][: 2 + m % 2])]
    with space.perturbed(0, [0, 1, 2, 3], trainer.args.sigma):
        batched, _ = completion_logps(model, prompts, completions, None, 4, 0, 1.0)
    for m in range(4):
        rows = slice(2 * m, 2 * m + 2)
        with space.perturbed(0, [m], trainer.args.sigma):
            alone, _ = completion_logps(model, prompts[rows], completions[rows], None, 1, 0, 1.0)
        for row, completion in enumerate(completions[rows]):
            torch.testing.assert_close(batched[2 * m + row, : len(completion)], alone[row, : len(completion)])
    trainer.train()
    assert any("kl" in entry for entry in trainer.state.log_history)
