"""Run a few ES steps with or without DeepSpeed ZeRO-3 and save the full final weights; launched by test_zero3.py.

python tests/zero3_worker.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH {plain,zero3} [TEMPERATURE]
torchrun --nproc_per_node 2 tests/zero3_worker.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH zero3 [TEMPERATURE]

With zero3 it also checks, after training, that one member's perturbation reaches the gathered weights (including
ZeRO-3's always-gathered "persistent" small parameters) and that restoring leaves every shard bit-identical.
"""

import contextlib
import os
import sys

import torch
from worker_exit import leave_together


# Parameters up to this size stay gathered between steps ("persistent"): the layer norms of the tiny model are,
# its matrices are not, so both kinds are exercised.
PERSISTENCE_THRESHOLD = 100
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def text_reward(completions, **kwargs):
    # Depends on which tokens were generated, not only how many: greedy members of a random tiny model differ here.
    return [float(sum(map(ord, c)) % 11) for c in completions]


def full_weights(trainer):
    """Full fp32 copies of every parameter (gathered under ZeRO-3)."""
    params = list(trainer.model.named_parameters())
    gather = contextlib.nullcontext()
    if trainer.is_deepspeed_enabled:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in params])
    with gather:
        return {name: param.detach().clone() for name, param in params}


def check_perturb_restore(trainer):
    """Perturb member 1 (a negative antithetic member) of the next step and restore; return what was observed."""
    space, step = trainer.perturbation_space, trainer.state.global_step
    before_full = full_weights(trainer)
    before_shards = [shard.clone() for shard in space.local_tensors()]
    with space.perturbed(step, [1], trainer.args.sigma):
        during = full_weights(trainer)
    after_shards = space.local_tensors()
    after_full = full_weights(trainer)
    worst = 0.0
    for name, before in before_full.items():
        expected = (
            before + trainer.perturbation_space.noise.member_noise(step, 1, name, before.shape) * trainer.args.sigma
        )
        worst = max(worst, float((during[name] - expected).abs().max()))
    return {
        "persistent": sorted(n for n, p in trainer.model.named_parameters() if getattr(p, "ds_persist", False)),
        "max_error_of_gathered_perturbation": worst,
        "every_tensor_perturbed": all(not torch.equal(during[n], before_full[n]) for n in before_full),
        "shards_restored_bitwise": all(torch.equal(a, b) for a, b in zip(after_shards, before_shards, strict=True)),
        "full_restored_bitwise": all(torch.equal(after_full[n], before_full[n]) for n in before_full),
    }


def main():
    from trl_es import ESConfig, ESTrainer
    from trl_es.tasks import arithmetic_dataset

    model_dir, out_dir, per_device_batch, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    temperature = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    args = ESConfig(
        output_dir=out_dir,
        use_cpu=True,
        report_to="none",
        max_steps=3,
        per_device_train_batch_size=per_device_batch,
        num_generations=2,
        population_size=4,
        sigma=0.05,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        temperature=temperature,
        max_completion_length=4,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=11,
        deepspeed=ZERO3 if mode == "zero3" else None,
    )
    trainer = ESTrainer(
        model_dir, reward_funcs=text_reward, args=args, train_dataset=arithmetic_dataset("train", size=64)
    )
    initial = full_weights(trainer)
    trainer.train()
    result = {
        "weights": full_weights(trainer),
        "initial": initial,
        "log": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "world": trainer.accelerator.num_processes,
        "space": type(trainer.perturbation_space).__name__,
    }
    if mode == "zero3":
        result["engine_steps"] = trainer.deepspeed.global_steps
        result["perturb_restore"] = check_perturb_restore(trainer)
    # Every rank saves: the weights are gathered (the same everywhere), the shard checks are per rank.
    torch.save(result, os.path.join(out_dir, f"result_rank{trainer.accelerator.process_index}.pt"))
    leave_together()  # see worker_exit.py: no gloo abort at exit


if __name__ == "__main__":
    main()
