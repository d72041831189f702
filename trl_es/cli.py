"""``trl-es``: the command line, in the style of ``trl grpo --config recipe.yaml``.

    trl-es train --config recipes/quickstart.yaml [--learning_rate 3e-4 ...]
    trl-es compare --config recipes/quickstart.yaml --output_dir outputs/compare [--seeds 3] [--grid]

YAML keys (and ``--key value`` overrides, which win) are the fields of ``ESScriptArguments`` below, of
[`ESConfig`] (all of ``GRPOConfig`` included) and of TRL's ``ModelConfig`` (``model_name_or_path``, ``use_peft``,
``lora_r``, ...). ``builtin:`` names select the offline embedded default: ``dataset_name: builtin:arithmetic`` and
``model_name_or_path: builtin:arithmetic-policy``.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config


logger = logging.getLogger("trl_es")

BUILTIN = "builtin:"


@dataclass
class ESScriptArguments(ScriptArguments):
    """What the ``train`` command loads: dataset, reward functions, and how held-out accuracy is reported."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: names from `trl.rewards` (e.g. 'accuracy_reward') or `trl_es.tasks` (e.g. "
            "'arithmetic_accuracy'), dotted import paths ('my_pkg.rewards.f'), or reward-model ids/paths."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A reward model (sequence classifier) used as an extra reward function."}
    )
    dataset_data_files: str | None = field(
        default=None,
        metadata={"help": "Local data files for `dataset_name` formats such as 'json' or 'csv' (glob allowed)."},
    )
    dataset_train_size: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (deterministic)."}
    )
    dataset_test_size: int | None = field(
        default=None, metadata={"help": "Keep only the first N held-out examples (deterministic)."}
    )
    conversational: bool = field(
        default=False, metadata={"help": "Built-in datasets only: emit chat-style prompts instead of plain text."}
    )
    accuracy_reward: str | None = field(
        default=None,
        metadata={
            "help": "Reward function whose held-out mean is reported as `eval_accuracy` (default: the first one)."
        },
    )
    eval_before_training: bool = field(
        default=True,
        metadata={"help": "Score the held-out split before training too (`eval_accuracy_before`)."},
    )


def resolve_model(name: str) -> str:
    if name.startswith(BUILTIN):
        from .tasks import ARITHMETIC_POLICY_DIR

        builtin = {"arithmetic-policy": ARITHMETIC_POLICY_DIR}
        key = name[len(BUILTIN) :]
        if key not in builtin:
            raise ValueError(f"unknown built-in model {name!r}; available: {[BUILTIN + k for k in builtin]}")
        return str(builtin[key])
    return name


def load_datasets(script_args: ESScriptArguments):
    """(train, test) datasets from a built-in task, a local file format, a local folder or a hub id."""
    name = script_args.dataset_name
    if not name:
        raise ValueError(
            "dataset_name is required (e.g. 'builtin:arithmetic', 'json' with dataset_data_files, or a hub id)"
        )
    if name.startswith(BUILTIN):
        from .tasks import arithmetic_dataset, hub_tasks

        key = name[len(BUILTIN) :]
        if key == "arithmetic":
            train = arithmetic_dataset("train", conversational=script_args.conversational)
            test = arithmetic_dataset("test", conversational=script_args.conversational)
        elif key in ("gsm8k", "countdown"):  # need the hub: GPU recipes
            data = getattr(hub_tasks, key)()
            train, test = data["train"], data["test"]
        else:
            raise ValueError(
                f"unknown built-in dataset {name!r}; available: "
                "['builtin:arithmetic', 'builtin:gsm8k' (hub), 'builtin:countdown' (hub)]"
            )
    else:
        from datasets import load_dataset

        try:
            data = load_dataset(name, name=script_args.dataset_config, data_files=script_args.dataset_data_files)
        except (OSError, ConnectionError, ValueError) as error:
            raise type(error)(
                f"Could not load dataset {name!r}: {error}. Without network access only local files and folders "
                "load; use 'builtin:arithmetic', or 'json'/'csv' with dataset_data_files."
            ) from error
        train = data[script_args.dataset_train_split]
        test = data[script_args.dataset_test_split] if script_args.dataset_test_split in data else None
    if script_args.dataset_train_size is not None:
        train = train.select(range(min(script_args.dataset_train_size, len(train))))
    if test is not None and script_args.dataset_test_size is not None:
        test = test.select(range(min(script_args.dataset_test_size, len(test))))
    return train, test


def load_reward_funcs(script_args: ESScriptArguments) -> list:
    from .rewards import resolve_reward_func

    sys.path.insert(0, os.getcwd())  # dotted paths may point into the user's working directory
    funcs = [resolve_reward_func(spec) for spec in script_args.reward_funcs or []]
    if script_args.reward_model_name_or_path:
        funcs.append(script_args.reward_model_name_or_path)
    if not funcs:
        raise ValueError("reward_funcs is empty: name at least one reward function (e.g. 'arithmetic_accuracy').")
    return funcs


def _accuracy(metrics: dict, reward_name: str) -> float | None:
    return metrics.get(f"eval_rewards/{reward_name}/mean")


def train(script_args: ESScriptArguments, training_args, model_args: ModelConfig) -> dict:
    """Train with ESTrainer; write the model, ``train_results.json`` and ``eval_results.json`` to output_dir."""
    from .trainer import ESTrainer

    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (e.g. 'builtin:arithmetic-policy', a local path or hub id)")
    model = resolve_model(model_args.model_name_or_path)
    model_init_kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation:
        model_init_kwargs["attn_implementation"] = model_args.attn_implementation
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

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

    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
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


def make_parser() -> TrlParser:
    from .config import ESConfig

    return TrlParser((ESScriptArguments, ESConfig, ModelConfig), prog="trl-es train")


def parse_train_args(argv: list[str]):
    """``(script_args, ESConfig, ModelConfig)`` from ``--config recipe.yaml`` and ``--key value`` overrides.

    Like ``TrlParser.parse_args_and_config``, but a recipe may carry the comparison sections: ``es:`` is merged into
    the top level, ``grpo:`` and ``compare:`` (read by ``trl-es compare``) are skipped.
    """
    from .compare.plan import load_recipe, train_config

    parser = make_parser()
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ValueError("--config needs a recipe path")
        path = argv[index + 1]
        del argv[index : index + 2]
        config = train_config(load_recipe(path))
        for key, value in (config.pop("env", None) or {}).items():
            os.environ[key] = str(value)
        unknown = parser.set_defaults_with_config(**config)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown[::2]}; keys must be fields of the train arguments")
    return parser.parse_args_into_dataclasses(args=argv)


USAGE = """usage: trl-es <command> [--config recipe.yaml] [--key value ...]

commands:
  train     train a model with ESTrainer (evolution strategies)
  compare   ES against GRPO on the same recipe and budget (writes compare.json / .md / .png)

Run `trl-es train --help` or `trl-es compare --help` for every option.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        script_args, training_args, model_args = parse_train_args(rest)
        train(script_args, training_args, model_args)
        return 0
    if command == "compare":
        from .compare.run import main as compare_main

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return compare_main(rest)
    print(f"trl-es: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
