"""Resuming from a checkpoint gives bit-identical weights to an uninterrupted run (CPU)."""

import torch
from conftest import es_config, length_reward

from trl_es import ESTrainer
from trl_es.tasks import arithmetic_dataset


def test_resume_is_bit_exact(tiny_model_dir, tmp_path):
    def trainer(path):
        # Sampled decoding and Adam: the sampling seeds and the optimizer state must both resume exactly.
        args = es_config(path, max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch", temperature=1.0)
        return ESTrainer(
            tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=arithmetic_dataset("train", size=64)
        )

    full = trainer(tmp_path / "full")
    full.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), f"{name} differs after resume"
