"""The recipe format, read by ``trl-es train`` and ``trl-es compare`` alike.

A recipe is a YAML mapping. Its top level holds the fields of ``ESScriptArguments`` (data, rewards, evaluation),
of [`ESConfig`] (every ``GRPOConfig`` field included) and of TRL's ``ModelConfig``; three optional sections hold
what only a comparison reads::

    es: {...}        # more ES-arm settings (merged over the top level by ``trl-es train`` too)
    grpo: {...}      # the GRPO arm's own settings, on top of TRL's GRPOConfig defaults
    variants: {...}  # more ES arms: {name: {settings over the ES arm's}}
    compare: {...}   # the budget, validation split, arms and grid of ``trl-es compare``

``--key value`` on the command line overrides a key (``--grpo.key value`` a key of a section,
``--variants.NAME.key value`` a key of one variant, creating it if needed). ``builtin:`` names
select the offline embedded default: ``dataset_name: builtin:arithmetic``, ``model_name_or_path:
builtin:arithmetic-policy``.
"""

import os
from dataclasses import dataclass, field

import yaml
from trl import ModelConfig, ScriptArguments, TrlParser

from .config import ESConfig
from .recipe_checks import check_recipe_types, load_yaml_strict


VARIANTS = "variants"
SECTIONS = ("es", "grpo", VARIANTS, "compare")


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
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A trained PEFT adapter to load (trainable) on top of `model_name_or_path`, e.g. ESSA's SFT warm "
            "start: 'builtin:arithmetic-lora', or a local adapter folder."
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
    dataset_validation_size: int | None = field(
        default=None,
        metadata={
            "help": "Carve the last N rows of the training split out as a validation split: they are removed from "
            "training, and are disjoint from the held-out test split. `trl-es compare` selects each arm's settings "
            "on it (`--grid`; set by compare.validation_size). builtin:arithmetic: N=500 gives the task's "
            "`validation` split. Applied before dataset_train_size, which then keeps the first rows of the rest."
        },
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


def load_recipe(path: str) -> dict:
    recipe = load_yaml_strict(path)  # duplicate keys are an error, not "last one wins"
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must contain a YAML mapping")
    for section in SECTIONS:
        if section in recipe and not isinstance(recipe[section] or {}, dict):
            raise ValueError(f"recipe {path}: section {section!r} must be a mapping of config fields")
    return recipe


def train_config(recipe: dict) -> dict:
    """The keys ``trl-es train`` uses: top level plus the ``es`` section, without the comparison-only sections
    (``grpo``, ``variants``, ``compare``)."""
    config = {key: value for key, value in recipe.items() if key not in SECTIONS}
    config.update(recipe.get("es") or {})
    return config


def _scalar(text: str):
    """A command-line value as YAML reads it, except that ``1e-4`` is a number (YAML 1.1 wants ``1.0e-4``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def parse_overrides(argv: list[str]) -> dict:
    """``--key value`` pairs (``--grpo.learning_rate 1e-4`` targets a section); values parsed as YAML scalars."""
    overrides = {}
    index = 0
    while index < len(argv):
        key = argv[index]
        if not key.startswith("--") or index + 1 >= len(argv):
            raise ValueError(f"expected '--key value' pairs, got {argv[index:]!r}")
        overrides[key[2:]] = _scalar(argv[index + 1])
        index += 2
    return overrides


def make_parser() -> TrlParser:
    return TrlParser((ESScriptArguments, ESConfig, ModelConfig), prog="trl-es train")


def parse_train_args(argv: list[str]):
    """``(script_args, ESConfig, ModelConfig)`` from ``--config recipe.yaml`` and ``--key value`` overrides.

    Like ``TrlParser.parse_args_and_config``, but a recipe may carry the comparison sections: ``es:`` is merged into
    the top level, ``grpo:``, ``variants:`` and ``compare:`` (read by ``trl-es compare``) are skipped.
    """
    parser = make_parser()
    argv = list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ValueError("--config needs a recipe path")
        path = argv[index + 1]
        del argv[index : index + 2]
        config = train_config(load_recipe(path))
        problems = check_recipe_types(config, parser.dataclass_types)
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
        for key, value in (config.pop("env", None) or {}).items():
            os.environ[key] = str(value)
        unknown = parser.set_defaults_with_config(**config)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown[::2]}; keys must be fields of the train arguments")
    return parser.parse_args_into_dataclasses(args=argv)
