"""Run a few ES steps and save the final weights; launched by test_distributed.py with 1 or 2 processes.

torchrun --nproc_per_node 2 tests/distributed_worker.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH [PERTURBATION [TEMPERATURE
    [PROMPT_GROUPS]]]
"""

import os
import sys

import torch
from worker_exit import leave_together


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def main():
    from trl_es import ESConfig, ESTrainer
    from trl_es.tasks import arithmetic_dataset

    model_dir, out_dir, per_device_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    perturbation = sys.argv[4] if len(sys.argv) > 4 else "full"
    temperature = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    prompt_groups = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    # "svd": ESSA, CMA-ES over the singular values of a LoRA adapter
    essa = perturbation == "svd"
    peft_config = None
    if essa:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
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
        temperature=temperature,
        max_completion_length=4,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        perturbation=perturbation,
        strategy="cma" if essa else "gaussian",
        prompt_groups=prompt_groups,
        seed=11,
    )
    trainer = ESTrainer(
        model_dir,
        reward_funcs=length_reward,
        args=args,
        train_dataset=arithmetic_dataset("train", size=64),
        peft_config=peft_config,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        weights = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
        torch.save(
            {"weights": weights, "log": trainer.state.log_history, "world": trainer.accelerator.num_processes},
            os.path.join(out_dir, "result.pt"),
        )
    leave_together()  # see worker_exit.py: no gloo abort at exit


if __name__ == "__main__":
    main()
