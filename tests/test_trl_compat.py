"""What ESTrainer relies on in GRPOTrainer's private internals: pinned here so a TRL upgrade fails one clear test."""

import pytest
from conftest import es_config, length_reward

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
