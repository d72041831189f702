"""The low_rank space inside ESTrainer: member rows of a real Qwen2 model match explicitly perturbed copies."""

import math

import pytest
import torch
from conftest import es_config, length_reward, snapshot
from transformers import AutoModelForCausalLM

from trl_es import ESTrainer
from trl_es.tasks import arithmetic_dataset


def low_rank_trainer(model_dir, tmp_path, **overrides):
    args = es_config(tmp_path, perturbation="low_rank", perturbation_rank=2, **overrides)
    return ESTrainer(
        model_dir, reward_funcs=length_reward, args=args, train_dataset=arithmetic_dataset("train", size=32)
    )


def test_member_logits_equal_explicitly_perturbed_qwen2(tiny_model_dir, tmp_path):
    trainer = low_rank_trainer(tiny_model_dir, tmp_path)
    space = trainer.perturbation_space
    model = trainer.model
    assert trainer.perturbation_name == "low_rank" and space.members_per_forward == 4
    assert "lm_head" not in {name for name, _ in space.named_linears}
    ids = torch.randint(0, 200, (3, 7))
    members = [0, 1, 2, 3]  # two mirrored pairs: both signs
    with torch.no_grad(), space.perturbed(5, members, trainer.args.sigma):
        batched = model(input_ids=ids.repeat(len(members), 1)).logits
    for g, member in enumerate(members):
        explicit = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        direction, sign = space.noise.direction_and_sign(member)
        modules = dict(explicit.named_modules())
        with torch.no_grad():
            for name, _module in space.named_linears:
                a, b = space.factors(5, direction, name)
                modules[name].weight += sign * trainer.args.sigma * (a @ b.T) / math.sqrt(space.rank)
            expected = explicit(input_ids=ids).logits
        got = batched[g * 3 : (g + 1) * 3]
        assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_low_rank_training_moves_only_linear_weights(tiny_model_dir, tmp_path):
    trainer = low_rank_trainer(tiny_model_dir, tmp_path, population_batch_size=2)
    assert trainer.perturbation_space.member_groups() == [[0, 1], [2, 3]]
    before = snapshot(trainer.model)
    trainer.train()
    targets = {f"{name}.weight" for name, _ in trainer.perturbation_space.named_linears}
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= targets
    assert "model.embed_tokens.weight" not in changed
    assert "es/update_norm" in trainer.state.log_history[-2] or "es/update_norm" in trainer.state.log_history[0]


def test_low_rank_rejects_peft_and_unknown_targets(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="does not combine with PEFT"):
        ESTrainer(
            tiny_model_dir,
            reward_funcs=length_reward,
            args=es_config(tmp_path, perturbation="low_rank"),
            train_dataset=arithmetic_dataset("train", size=8),
            peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
        )
    with pytest.raises(ValueError, match=r"perturbation_target_modules=\['qkv'\] matches no"):
        low_rank_trainer(tiny_model_dir, tmp_path, perturbation_target_modules=["qkv"])
    only_q = low_rank_trainer(tiny_model_dir, tmp_path, perturbation_target_modules=["q_proj"])
    assert all(name.endswith("q_proj") for name, _ in only_q.perturbation_space.named_linears)


def test_low_rank_kernel_reaches_the_space_and_is_checked(tiny_model_dir, tmp_path, caplog):
    assert low_rank_trainer(tiny_model_dir, tmp_path).perturbation_space.kernel == "auto"
    on_torch_ops = low_rank_trainer(tiny_model_dir, tmp_path, low_rank_kernel="torch").perturbation_space
    assert on_torch_ops.kernel == "torch" and not on_torch_ops.uses_compiled_kernel
    with pytest.raises(ValueError, match=r"low_rank_kernel must be one of \['auto', 'compiled', 'torch'\], got 'c'"):
        es_config(tmp_path, perturbation="low_rank", low_rank_kernel="c")
    with caplog.at_level("WARNING"):
        ESTrainer(
            tiny_model_dir,
            reward_funcs=length_reward,
            args=es_config(tmp_path, perturbation="full", low_rank_kernel="torch"),
            train_dataset=arithmetic_dataset("train", size=8),
        )
    assert "low_rank_kernel='torch' is ignored" in caplog.text
