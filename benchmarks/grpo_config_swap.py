"""What a GRPO user gets by swapping the class name only: ESTrainer with a plain GRPOConfig on the quickstart task.

    python benchmarks/grpo_config_swap.py [--steps 50] [--json OUT]

Trains the shipped arithmetic policy with `ESTrainer` and `GRPOConfig(output_dir=..., bf16=False)` plus the task's
generation length, i.e. GRPO's defaults for everything else, three ways:

* ``converted``: what ESTrainer does with that config: GRPO's data and decoding (8 rows, 8 samples at temperature
  1: one distinct prompt a step) and, for the optimisation fields left at GRPO's defaults, ES's: SGD at Qiu et al.'s
  step for sigma 1e-3 (learning rate 1.73e-6), no clipping;
* ``before``: the conversion of the previous release: the same but SGD at the old fixed default learning rate 1e-4;
* ``grpo_optimiser``: the same data with GRPO's optimiser (AdamW at 1e-6, clipping at 1.0), which is what the
  conversion did before that.

Prints held-out greedy accuracy (500 problems) before and after each, and the load average
(timings are not reported: the point is what the settings learn, not how fast).
"""

import argparse
import json
import os
import tempfile

import torch
from trl import GRPOConfig

from trl_es import ESConfig, ESTrainer
from trl_es.evaluation import greedy_accuracy
from trl_es.tasks import ARITHMETIC_POLICY_DIR, arithmetic_accuracy, arithmetic_dataset


GRPO_DATA = dict(per_device_train_batch_size=8, num_generations=8, temperature=1.0)
VARIANTS = {
    "converted": None,  # the GRPOConfig alone
    "before": dict(learning_rate=1e-4, optim="sgd"),  # set in the GRPOConfig, so the conversion keeps them
    "grpo_optimiser": dict(GRPO_DATA, learning_rate=1e-6, optim="adamw_torch_fused", max_grad_norm=1.0),
}


def run(name: str, steps: int, output_dir: str) -> dict:
    script = dict(
        output_dir=output_dir,
        bf16=False,
        max_steps=steps,
        max_completion_length=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=steps,
        seed=42,
    )
    if name == "grpo_optimiser":  # GRPO's own values cannot be set through a GRPOConfig: they are its defaults
        args = ESConfig(**script, **VARIANTS[name])
    else:
        args = ESConfig.from_grpo_config(GRPOConfig(**script, **(VARIANTS[name] or {})))
    trainer = ESTrainer(
        str(ARITHMETIC_POLICY_DIR),
        reward_funcs=arithmetic_accuracy,
        args=args,
        train_dataset=arithmetic_dataset("train"),
    )
    held_out = arithmetic_dataset("test", size=500)

    def accuracy():
        return greedy_accuracy(trainer.model, trainer.processing_class, held_out, arithmetic_accuracy, 4, 250)

    before = accuracy()
    trainer.train()
    return {
        "settings": name,
        "learning_rate": args.learning_rate,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "max_grad_norm": args.max_grad_norm,
        "sigma": args.sigma,
        "population_size": args.population_size,
        "distinct_prompts_per_step": args.generation_batch_size // args.num_generations,
        "temperature": args.temperature,
        "steps": steps,
        "accuracy_before": before,
        "accuracy_after": accuracy(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results, load_at_start = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for name in VARIANTS:
            results.append(run(name, args.steps, os.path.join(folder, name)))
            print(json.dumps(results[-1]), flush=True)
    report = {"runs": results, "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
