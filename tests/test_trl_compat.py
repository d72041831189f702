"""What ESTrainer relies on in GRPOTrainer's private internals: pinned here so a TRL upgrade fails one clear test."""

import inspect

import pytest
from conftest import es_config, length_reward
from trl import GRPOTrainer

from trl_es import ESTrainer, trl_compat
from trl_es.tasks import arithmetic_dataset


@pytest.fixture
def trainer(tiny_model_dir, tmp_path):
    return ESTrainer(
        tiny_model_dir,
        reward_funcs=length_reward,
        args=es_config(tmp_path),
        train_dataset=arithmetic_dataset("train", size=8),
    )


def test_every_internal_we_use_exists_and_generate_returns_what_we_read(trainer):
    trl_compat.check_trl_internals(trainer)
    prompts = ["1+2=", "3+4="]
    completion_ids, completions = trl_compat.generate(trainer, prompts)
    assert len(completion_ids) == len(completions) == 2
    assert all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in completion_ids)
    assert trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True) == completions
    rows = [{"prompt": p} for p in prompts]
    rewards = trl_compat.calculate_rewards(trainer, rows, prompts, completions, completion_ids)
    assert rewards.shape == (2, 1) and rewards.dtype.is_floating_point


def test_a_missing_internal_is_named_with_the_trl_version(trainer):
    del trainer._pending_metrics
    with pytest.raises(RuntimeError, match=r"_pending_metrics .*trl 1\.\d+"):
        trl_compat.check_trl_internals(trainer)


def test_pending_logs_are_taken_once(trainer):
    trainer._pending_extra_logs["col"].extend([1, 2])
    trainer._pending_metrics["m"].append(3.0)
    assert trl_compat.take_extra_logs(trainer) == {"col": [1, 2]}
    assert trl_compat.take_extra_logs(trainer) == {}
    assert trl_compat.take_logged_metrics(trainer) == {"m": [3.0]}
    assert trl_compat.take_logged_metrics(trainer) == {}


def test_grpo_reads_the_reference_fields_we_hide_only_while_it_is_built(tiny_model_dir, tmp_path):
    # GRPOTrainer.__init__ decides from these whether to load a reference model and add SyncRefModelCallback; if it
    # read them under other names (or later), hiding them would no longer spare the memory of a second model.
    source = inspect.getsource(GRPOTrainer.__init__)
    for name in trl_compat.GRPO_REFERENCE_FIELDS:
        assert f"args.{name}" in source, f"GRPOTrainer.__init__ no longer reads args.{name}"
    args = es_config(tmp_path, beta=0.3, sync_ref_model=True)
    trainer = ESTrainer(
        tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=arithmetic_dataset("train", size=8)
    )
    assert trainer.beta == 0.0  # GRPO's own, unused by ES
    # ref_model shows ES's reference (trl_es.reference), whose tensors are the frozen copy's: no second model loaded
    reference = {t.data_ptr() for t in trainer.reference_kl.reference.tensors}
    assert {p.data_ptr() for p in trainer.ref_model.parameters()} == reference
    assert (args.beta, args.sync_ref_model) == (0.3, True)  # given back for ES


def test_rollout_with_tool_mask_has_no_mask_without_tools(trainer):
    prompt_ids, completion_ids, tool_mask, completions = trl_compat.rollout_with_tool_mask(trainer, ["1+2="])
    assert len(prompt_ids) == len(completion_ids) == len(completions) == 1 and tool_mask is None


def test_every_private_trainer_method_we_override_is_guarded():
    from transformers import Trainer

    from trl_es.compare.arm import RolloutCounter
    from trl_es.update_step import UpdateStepMixin

    def overridden(cls):
        return {
            name
            for name, value in vars(cls).items()
            if name.startswith("_") and not name.startswith("__") and callable(value)
            and any(hasattr(base, name) for base in (GRPOTrainer, Trainer))
        }  # fmt: skip

    ours = overridden(ESTrainer) | overridden(UpdateStepMixin) | overridden(RolloutCounter)
    guarded = set(trl_compat.OVERRIDDEN_TRAINER_METHODS)
    assert ours and ours <= guarded, ours - guarded


def test_no_module_but_trl_compat_reaches_into_trainer_privates():
    import pathlib
    import re

    package = pathlib.Path(trl_compat.__file__).parent
    private = re.compile(r"\._metrics\b|\._save_checkpoint\(|\._generate\(|\._calculate_rewards\(|from trl\.trainer")
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "trl_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # super() calls inside an override are the override itself (guarded above)
            if private.search(line) and "super()." not in line:
                offenders.append(f"{path.relative_to(package)}:{number}: {line.strip()}")
    assert not offenders, offenders
