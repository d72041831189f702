"""``trl-es train``: load a recipe's model, data and rewards, train with ``ESTrainer``, report held-out accuracy.

The ``compare`` harness loads its arms with the same functions, so both commands read a recipe the same way.
"""

import os
import sys

import torch
from datasets import load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM
from trl import ModelConfig, get_peft_config

from .. import trl_compat
from ..builtin_models import BUILTIN, resolve_model
from ..recipes import ESScriptArguments, parse_train_args
from ..rewards import resolve_reward_funcs
from ..tasks import arithmetic_dataset, chat_arithmetic_dataset, hub_tasks
from ..trainer import ESTrainer


def load_model(model_args: ModelConfig, script_args: ESScriptArguments, training_args):
    """What the trainer gets as ``model``: the model's path or hub id (the trainer loads it with
    ``model_init_kwargs``), or, with ``adapter_name_or_path``, the model with that adapter loaded trainable."""
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (e.g. 'builtin:arithmetic-policy', a local path or hub id)")
    model = resolve_model(model_args.model_name_or_path)
    model_init_kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation:
        model_init_kwargs["attn_implementation"] = model_args.attn_implementation
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    if not script_args.adapter_name_or_path:
        return model
    if model_args.use_peft:
        raise ValueError("adapter_name_or_path loads a trained adapter; use_peft would add a second, new one: drop it")
    adapter = resolve_model(script_args.adapter_name_or_path)
    kwargs = {key: value for key, value in training_args.model_init_kwargs.items() if value is not None}
    if kwargs.get("dtype") == "auto":
        kwargs["dtype"] = torch.float32 if training_args.use_cpu or not torch.cuda.is_available() else "auto"
    base = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    return PeftModel.from_pretrained(base, adapter, is_trainable=True)


def load_datasets(script_args: ESScriptArguments):
    """(train, test) datasets from a built-in task, a local file format, a local folder or a hub id; the rows of a
    validation carve-out (``dataset_validation_size``) are not in train."""
    train, _, test = load_splits(script_args)
    return train, test


def load_splits(script_args: ESScriptArguments):
    """(train, validation, test): validation is ``None`` unless ``dataset_validation_size`` carves the last rows of
    the training split out (then they are removed from train; test is never touched)."""
    name = script_args.dataset_name
    if not name:
        raise ValueError(
            "dataset_name is required (e.g. 'builtin:arithmetic', 'json' with dataset_data_files, or a hub id)"
        )
    if name.startswith(BUILTIN):
        key = name[len(BUILTIN) :]
        if key == "arithmetic":
            train = arithmetic_dataset("train", conversational=script_args.conversational)
            test = arithmetic_dataset("test", conversational=script_args.conversational)
        elif key == "chat_arithmetic":  # always conversational: the task of builtin:smollm2-135m-instruct
            train, test = chat_arithmetic_dataset("train"), chat_arithmetic_dataset("test")
        elif key in ("gsm8k", "countdown"):  # need the hub: GPU recipes
            data = getattr(hub_tasks, key)()
            train, test = data["train"], data["test"]
        else:
            raise ValueError(
                f"unknown built-in dataset {name!r}; available: "
                "['builtin:arithmetic', 'builtin:chat_arithmetic', 'builtin:gsm8k' (hub), 'builtin:countdown' (hub)]"
            )
    else:
        try:
            data = load_dataset(name, name=script_args.dataset_config, data_files=script_args.dataset_data_files)
        except (OSError, ConnectionError, ValueError) as error:
            raise type(error)(
                f"Could not load dataset {name!r}: {error}. Without network access only local files and folders "
                "load; use 'builtin:arithmetic', or 'json'/'csv' with dataset_data_files."
            ) from error
        train = data[script_args.dataset_train_split]
        test = data[script_args.dataset_test_split] if script_args.dataset_test_split in data else None
    validation = None
    size = script_args.dataset_validation_size
    if size is not None:
        # The last rows, so that dataset_train_size (the first rows) and every recipe's prompt stream start alike.
        if not 1 <= size < len(train):
            raise ValueError(
                f"dataset_validation_size={size}: the training split {script_args.dataset_train_split!r} of "
                f"{name!r} has {len(train)} rows; carve out between 1 and {len(train) - 1}"
            )
        validation = train.select(range(len(train) - size, len(train)))
        train = train.select(range(len(train) - size))
    if script_args.dataset_train_size is not None:
        train = train.select(range(min(script_args.dataset_train_size, len(train))))
    if test is not None and script_args.dataset_test_size is not None:
        test = test.select(range(min(script_args.dataset_test_size, len(test))))
    return train, validation, test


def load_reward_funcs(script_args: ESScriptArguments) -> list:
    sys.path.insert(0, os.getcwd())  # dotted paths may point into the user's working directory
    funcs = resolve_reward_funcs(script_args.reward_funcs)
    if script_args.reward_model_name_or_path:
        funcs.append(script_args.reward_model_name_or_path)
    if not funcs:
        raise ValueError("reward_funcs is empty: name at least one reward function (e.g. 'arithmetic_accuracy').")
    return funcs


def _accuracy(metrics: dict, reward_name: str) -> float | None:
    return metrics.get(f"eval_rewards/{reward_name}/mean")


def train(script_args: ESScriptArguments, training_args, model_args: ModelConfig) -> dict:
    """Train with ESTrainer; write the model, ``train_results.json`` and ``eval_results.json`` to output_dir."""
    model = load_model(model_args, script_args, training_args)
    train_dataset, test_dataset = load_datasets(script_args)
    reward_funcs = load_reward_funcs(script_args)
    trainer = ESTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=test_dataset,
        peft_config=get_peft_config(model_args),
    )
    accuracy_name = script_args.accuracy_reward or trainer.reward_func_names[0]
    if accuracy_name not in trainer.reward_func_names:
        raise ValueError(f"accuracy_reward={accuracy_name!r} is not one of {trainer.reward_func_names}")

    before = None
    if test_dataset is not None and script_args.eval_before_training:
        before = trainer.evaluate()
        trainer.accelerator.print(f"held-out accuracy before ES: {_accuracy(before, accuracy_name):.4f}")

    try:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except KeyboardInterrupt:
        save_interrupted(trainer)
        raise
    trainer.save_model(training_args.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    eval_metrics = {}
    if test_dataset is not None:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_accuracy_after"] = _accuracy(eval_metrics, accuracy_name)
        eval_metrics["eval_accuracy"] = eval_metrics["eval_accuracy_after"]
        if before is not None:
            eval_metrics["eval_accuracy_before"] = _accuracy(before, accuracy_name)
        eval_metrics["eval_accuracy_reward"] = accuracy_name
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        summary = f"held-out accuracy after ES: {eval_metrics['eval_accuracy_after']:.4f}"
        if before is not None:
            summary += f" (before: {eval_metrics['eval_accuracy_before']:.4f})"
        trainer.accelerator.print(summary)
    return {"train": result.metrics, "eval": eval_metrics}


def save_interrupted(trainer) -> str:
    """After Ctrl-C: keep what the completed steps learned.

    The weights are those after the last completed ES step: a member's perturbation is undone on the way out of its
    block, and a Ctrl-C during the optimizer step is held until that step, bookkeeping included, is finished
    (``UpdateStepMixin._stop_after_this_step``), so the weights always match ``global_step``. Saves a resumable
    checkpoint (``checkpoint-<step>``: weights, optimizer, scheduler, RNG, trainer state) and the model in
    ``output_dir``.
    """
    step = trainer.state.global_step
    trainer.accelerator.print(f"\ninterrupted: saving the weights after ES step {step} ...")
    trainer.model.zero_grad(set_to_none=True)  # a half-written pseudo-gradient must not reach the checkpoint
    trl_compat.save_checkpoint(trainer)
    trainer.save_model(trainer.args.output_dir)
    folder = os.path.join(trainer.args.output_dir, f"checkpoint-{step}")
    trainer.accelerator.print(
        f"saved {folder} (resume with --resume_from_checkpoint true) and the model in {trainer.args.output_dir}"
    )
    return folder


def main(argv: list[str]) -> int:
    script_args, training_args, model_args = parse_train_args(argv)
    train(script_args, training_args, model_args)
    return 0
