"""The in-place update (ESConfig.inplace_update): plain SGD applied from the seeds, with no p.grad, trains the very
same weights as the p.grad path, while the optimizer keeps no state, the LR schedule advances and the metrics stay.
Either way the update is made in the ES step (core.apply.apply_update), so the Trainer's optimizer step finds no
gradient."""

import pytest
import torch
from conftest import es_config, length_reward, snapshot
from transformers import TrainerCallback

from trl_es import ESTrainer
from trl_es.tasks import arithmetic_dataset


class WatchOptimizerStep(TrainerCallback):
    """Records, at every Trainer optimizer step, which evolved tensors hold a gradient and the optimizer's state."""

    def __init__(self):
        self.trainer = None
        self.grads_seen, self.state_sizes = [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        space = self.trainer.perturbation_space
        self.grads_seen.append([name for name, t in space.named_tensors() if t.grad is not None])

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.state_sizes.append(len(self.trainer.optimizer.state))


def run(model_dir, output_dir, perturbation, inplace_update, **overrides):
    peft_config = None
    if perturbation == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    else:
        overrides["perturbation"] = perturbation
    values = dict(max_steps=3, temperature=1.0, seed=5, lr_scheduler_type="linear", inplace_update=inplace_update)
    watch = WatchOptimizerStep()
    trainer = ESTrainer(
        model_dir,
        reward_funcs=length_reward,
        args=es_config(output_dir, **(values | overrides)),
        train_dataset=arithmetic_dataset("train", size=24),
        peft_config=peft_config,
        callbacks=[watch],
    )
    watch.trainer = trainer
    before = snapshot(trainer.model)
    trainer.train()
    return trainer, before, watch


# weight decay 0.1: the Trainer's two param groups (no decay for biases and norms), torch SGD's coupled L2 decay
@pytest.mark.parametrize(
    "perturbation, weight_decay", [("full", 0.0), ("full", 0.1), ("low_rank", 0.0), ("low_rank", 0.1), ("lora", 0.1)]
)
def test_inplace_update_trains_bit_identical_weights(tiny_model_dir, tmp_path, perturbation, weight_decay):
    inplace, before, watch = run(tiny_model_dir, tmp_path / "a", perturbation, None, weight_decay=weight_decay)
    grad, _, grad_watch = run(tiny_model_dir, tmp_path / "b", perturbation, False, weight_decay=weight_decay)
    assert inplace._inplace_update  # auto: plain SGD, max_grad_norm=0
    assert not grad._inplace_update
    # the Trainer's optimizer stepped (3 times) but found no gradient: both paths updated within the ES step, and
    # neither left optimizer state (plain SGD)
    assert watch.grads_seen == grad_watch.grads_seen == [[], [], []]
    assert watch.state_sizes == grad_watch.state_sizes == [0, 0, 0]
    moved = [n for n, p in inplace.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved, "the run must move the weights, or the comparison proves nothing"
    for (name, p), (_, q) in zip(inplace.model.named_parameters(), grad.model.named_parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach()), f"{name} differs between in-place and p.grad updates"

    logs = [log for log in inplace.state.log_history if "es/update_norm" in log]
    grad_logs = [log for log in grad.state.log_history if "es/update_norm" in log]
    assert len(logs) == len(grad_logs) == 3
    # the LR schedule advanced exactly as with the p.grad path
    assert [log["learning_rate"] for log in logs] == [log["learning_rate"] for log in grad_logs]
    assert len({log["learning_rate"] for log in logs}) == 3
    # grad_norm comes from the update itself (the norm of what p.grad would have held); update norm from the copy
    assert [log["grad_norm"] for log in logs] == pytest.approx([log["grad_norm"] for log in grad_logs], rel=1e-6)
    assert any(log["grad_norm"] > 0 for log in logs)
    assert [log["es/update_norm"] for log in logs] == [log["es/update_norm"] for log in grad_logs]


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(optim="adamw_torch"), "not torch.optim.SGD"),
        (dict(max_grad_norm=1.0), "max_grad_norm=1.0 clips"),
        (dict(optim_args="momentum=0.9"), "momentum=0.9"),
        (dict(anchor_decay=0.5), "anchor_decay=0.5 adds its pull"),  # the pull is written to p.grad
        (dict(strategy="ga"), "strategy='ga' writes no pseudo-gradient"),
        (dict(inplace_update=False), None),
    ],
)
def test_auto_falls_back_to_p_grad_when_the_optimizer_needs_it(tiny_model_dir, tmp_path, caplog, overrides, reason):
    import logging

    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=length_reward,
        args=es_config(tmp_path, **overrides),
        train_dataset=arithmetic_dataset("train", size=16),
    )
    with caplog.at_level(logging.INFO, logger="trl_es.update_step"):
        trainer.create_optimizer()
    assert not trainer._inplace_update
    if reason:
        assert "written to p.grad for the optimizer" in caplog.text and reason in caplog.text


def test_explicit_inplace_update_names_what_prevents_it(tiny_model_dir, tmp_path):
    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=length_reward,
        args=es_config(tmp_path, inplace_update=True, optim_args="momentum=0.9"),
        train_dataset=arithmetic_dataset("train", size=16),
    )
    with pytest.raises(ValueError, match=r"inplace_update=True, but SGD param group 0 has momentum=0.9"):
        trainer.create_optimizer()
    with pytest.raises(ValueError, match="inplace_update=True needs optim='sgd'"):
        es_config(tmp_path, inplace_update=True, optim="adamw_torch")
    with pytest.raises(ValueError, match="max_grad_norm=0.5 could not clip it"):
        es_config(tmp_path, inplace_update=True, max_grad_norm=0.5)
    with pytest.raises(ValueError, match="anchor_decay=0.5 adds its pull to the gradient"):
        es_config(tmp_path, inplace_update=True, anchor_decay=0.5)


def test_svd_space_and_cma_keep_their_own_update(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=length_reward,
        args=es_config(tmp_path, perturbation="svd", strategy="cma"),
        train_dataset=arithmetic_dataset("train", size=16),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="gaussian"),
    )
    trainer.create_optimizer()
    assert not trainer._inplace_update
