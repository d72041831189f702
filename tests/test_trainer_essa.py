"""ESSA in ESTrainer: CMA-ES over the singular values of a LoRA adapter (and Gaussian ES over the same space)."""

import pytest
import torch
from conftest import es_config, length_reward, snapshot
from peft import LoraConfig

from trl_es import ESTrainer
from trl_es.tasks import arithmetic_dataset


def lora():
    # gaussian init: LoRA's default zero B factor has no spectrum to evolve
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")


def essa_trainer(model_dir, path, **overrides):
    values = dict(perturbation="svd", strategy="cma", population_size=6, cma_sigma0=0.2, svd_fraction=1.0)
    return ESTrainer(
        model_dir,
        reward_funcs=length_reward,
        args=es_config(path, **{**values, **overrides}),
        train_dataset=arithmetic_dataset("train", size=64),
        peft_config=lora(),
    )


def test_cma_moves_only_the_adapter_through_its_singular_values(tiny_model_dir, tmp_path):
    trainer = essa_trainer(tiny_model_dir, tmp_path)
    assert trainer.perturbation_name == "svd"
    space = trainer.perturbation_space
    # 2 layers x 2 projections x (A and B) x 4 singular values
    assert space.num_parameters() == 32
    before = snapshot(trainer.model)
    start = space.get_vector().clone()
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in name for name in changed)
    # the model holds exactly what the evolved singular values say (= CMA-ES's mean)
    torch.testing.assert_close(space.get_vector(), trainer.strategy.search.mean.float())
    assert not torch.equal(space.get_vector(), start)
    rebuilt = space.rebuilt_weights()
    named = dict(trainer.model.named_parameters())
    for name, weight in rebuilt.items():
        assert torch.equal(named[name].detach(), weight.to(named[name].dtype)), name
    assert trainer.state.log_history[0]["es/search_dim"] == 32.0
    # CMA-ES moves the values inside tell; the update norm is measured from before it
    assert all(log["es/update_norm"] > 0 for log in trainer.state.log_history if "es/update_norm" in log)
    # CMA-ES steps by its own adapted sigma, not the optimizer's learning rate: the logs say so
    train_logs = [log for log in trainer.state.log_history if "es/search_dim" in log]
    assert train_logs and all("learning_rate" not in log for log in train_logs)
    assert train_logs[-1]["cma_sigma"] == pytest.approx(trainer.strategy.search.sigma)


def test_cma_resume_is_bit_identical(tiny_model_dir, tmp_path):
    full = essa_trainer(tiny_model_dir, tmp_path / "full", max_steps=4)
    full.train()
    first = essa_trainer(tiny_model_dir, tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2)
    first.train()  # writes checkpoint-2 (with es_state.pt) and checkpoint-4
    assert (tmp_path / "resumed" / "checkpoint-2" / "es_state.pt").is_file()
    resumed = essa_trainer(tiny_model_dir, tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert torch.equal(full.strategy.search.mean, resumed.strategy.search.mean)


def test_gaussian_es_over_singular_values_steps_them_with_the_optimizer(tiny_model_dir, tmp_path):
    from trl_es import ESConfig

    # cma_sigma0 back at its default: a CMA-ES setting given to the Gaussian strategy is refused by name
    default_sigma0 = ESConfig.__dataclass_fields__["cma_sigma0"].default
    trainer = essa_trainer(
        tiny_model_dir, tmp_path, strategy="gaussian", population_size=4, sigma=0.05, cma_sigma0=default_sigma0
    )
    start = trainer.perturbation_space.get_vector().clone()
    trainer.train()
    assert trainer.optimizer.param_groups[0]["params"][0] is trainer.perturbation_space.named_tensors()[0][1]
    assert not torch.equal(trainer.perturbation_space.get_vector(), start)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(perturbation="full"), "strategy='cma' needs perturbation='svd'"),
        (dict(svd_fraction=0.0), r"svd_fraction must be in \(0, 1\]"),
        (dict(cma_sigma0=float("nan")), "cma_sigma0 must be finite"),
    ],
)
def test_bad_essa_settings_are_named(tmp_path, overrides, message):
    values = dict(perturbation="svd", strategy="cma", population_size=6)
    with pytest.raises(ValueError, match=message):
        es_config(tmp_path, **{**values, **overrides})
