"""From one recipe to the arms of a comparison on the same budget (no model is loaded here).

A recipe is an ES training recipe plus optional sections::

    model_name_or_path: ...        # shared: script and model keys, and SHARED_TRAINING_KEYS
    dataset_name: ...
    learning_rate: 4.0e-4          # every other top-level key belongs to the ES arm (a train recipe is an ES recipe)
    es: {...}                      # optional: more ES-arm settings (win over top-level keys)
    variants:                      # optional: more ES arms, each named, each the ES arm's settings plus its own
      many: {perturbation: low_rank, population_size: 256, prompt_groups: 8}
      essa: {adapter_name_or_path: builtin:arithmetic-lora, perturbation: svd, strategy: cma}
    grpo: {...}                    # the GRPO arm's own settings, on top of TRL's GRPOConfig defaults (and vllm_dtype)
    compare: {budget_rollouts: ..., budget_seconds: ..., eval_points: ..., validation_size: ..., arms: [...],
              grid: {es: [lr, ...], essa: {cma_sigma0: [...]}, ...}}

Arms are run in the order ``es``, the variants in recipe order, ``grpo`` (``compare.arms`` or ``--arms`` picks a
subset). Every arm shares the task and the measurement: data, rewards, held-out and validation splits, seeds,
completion length, evaluation. An arm's section may set for itself only the shared keys that belong to its method,
``PER_ARM_MODEL_KEYS`` (a warm-start adapter, a PEFT wrapper): e.g. the GRPO arm can load the same
``adapter_name_or_path`` as an ESSA variant (it then trains the adapter's LoRA weights by policy gradient).

``trl-es train`` reads the same file and ignores ``grpo``, ``variants`` and ``compare`` (``es`` is merged in); the
format itself (loading, overrides) lives in ``trl_es/recipes.py``.
"""

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field

from trl import GRPOConfig, ModelConfig, TrlParser

from ..config import ESConfig, derived_learning_rate
from ..config_fields import vllm_dtype_problem
from ..recipe_checks import check_recipe_types, type_problem
from ..recipes import SECTIONS, VARIANTS, ESScriptArguments


# ESConfig fields a GRPO arm takes too: its colocated vLLM engine's settings (see parse_arm).
GRPO_ENGINE_KEYS = ("vllm_dtype",)
# Training keys that define the task or the measurement rather than an algorithm: every arm uses the same value.
SHARED_TRAINING_KEYS = (
    "seed",
    "max_completion_length",
    "per_device_eval_batch_size",
    "bf16",
    "fp16",
    "use_cpu",
    "report_to",
    "save_strategy",
    "logging_steps",
    "model_init_kwargs",
    "chat_template_kwargs",
    "reward_weights",
    "dataloader_num_workers",
)
# Shared (script or model) keys an arm may set in its own section: what the policy starts from and which of its
# weights are trainable is part of an arm's method (ESSA's SFT adapter), not of the task.
PER_ARM_MODEL_KEYS = (
    "adapter_name_or_path",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_parameters",
    "lora_modules_to_save",
    "lora_task_type",
    "use_rslora",
    "use_dora",
)
# Every arm otherwise starts from its config class's defaults: for GRPO that is TRL's GRPOConfig (DAPO loss, beta=0,
# 8 generations, temperature 1, AdamW). These only keep a comparison run quiet and free of checkpoints. Learning rate
# and batch belong in the recipe's `grpo:` section: TRL's default learning rate (1e-6) is tuned for billion-parameter
# models.
ARM_DEFAULTS = {"save_strategy": "no", "report_to": "none", "disable_tqdm": True}
GRID_FACTORS = (0.5, 1.0, 2.0)
# The compare section's keys and their types (checked before any arithmetic on them).
COMPARE_TYPES = {
    "budget_rollouts": int | None,
    "budget_seconds": float | None,
    "eval_points": int,
    "grid": dict | None,
    "validation_size": int | None,
    "arms": list[str] | None,
}
COMPARE_KEYS = tuple(COMPARE_TYPES)
ARM_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass
class ComparePlan:
    """Everything the harness needs: shared keys, each arm's keys and kind, the budget, the grids."""

    shared: dict
    arms: dict[str, dict]  # arm name -> its settings (shared keys excluded, but PER_ARM_MODEL_KEYS it sets)
    budget_rollouts: int
    budget_seconds: float | None
    eval_points: int
    # arm name -> grid points, each a dict of settings over the arm's own; [{}] runs the arm as it is
    grids: dict[str, list[dict]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # arm name -> "es" or "grpo"
    variants: dict[str, dict] = field(default_factory=dict)  # variant name -> its own keys over the ES arm
    validation_size: int | None = None

    def eval_every_rollouts(self) -> int:
        return max(1, math.ceil(self.budget_rollouts / self.eval_points))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _script_and_model_keys() -> set[str]:
    return {f.name for cls in (ESScriptArguments, ModelConfig) for f in dataclasses.fields(cls)}


def _es_only_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(ESConfig)} - {f.name for f in dataclasses.fields(GRPOConfig)}


def arm_classes(kind: str) -> tuple:
    """The dataclasses an arm's config fills: script arguments, ``ESConfig`` or TRL's ``GRPOConfig``, model config."""
    return ESScriptArguments, ESConfig if kind == "es" else GRPOConfig, ModelConfig


def _check_arm_types(arm: str, kind: str, config: dict) -> None:
    problems = check_recipe_types(config, arm_classes(kind))
    if problems:
        raise ValueError(f"{arm}: " + "; ".join(problems))


def _arm_label(arm: str, point: dict | None = None) -> str:
    return f"{arm} arm" + (" at grid point " + ", ".join(f"{k}={v}" for k, v in point.items()) if point else "")


def parse_arm(kind: str, config: dict, arm: str, point: dict | None = None) -> tuple:
    """``(script_args, training_args, model_args)`` from one arm's whole config, as its process parses them: every
    value type-checked, the config classes built (their own checks run); errors name the arm (and grid point).

    A GRPO arm may set ``vllm_dtype`` as ES's does (its colocated engine's dtype), though ``GRPOConfig`` has no such
    field: it is kept on the parsed config, where the harness's engine options read it."""
    label = _arm_label(arm, point)
    engine_dtype = None
    if kind != "es" and "vllm_dtype" in config:  # GRPO_ENGINE_KEYS
        config = dict(config)
        engine_dtype = config.pop("vllm_dtype")
    _check_arm_types(label, kind, config)
    try:
        parsed = TrlParser(arm_classes(kind)).parse_dict(config, allow_extra_keys=False)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{label}: {error}") from error
    if kind != "es":
        parsed[1].vllm_dtype = engine_dtype
        if problem := vllm_dtype_problem(parsed[1]):
            raise ValueError(f"{label}: {problem}")
    return parsed


def check_arms(plan: "ComparePlan", grid: bool, output_dir: str) -> None:
    """Parse the config of every arm (and grid point, with ``grid``) as its process will, before any arm trains.

    Arms run one after another for minutes each: an error in the last arm's settings found only when its turn comes
    would waste the others' time. All problems are named at once; nothing has run when this raises.
    """
    problems = []
    for name, config in plan.arms.items():
        for point in plan.grids[name] if grid else [{}]:
            try:
                parse_arm(plan.kinds[name], {**plan.shared, **config, **point, "output_dir": output_dir}, name, point)
            except ValueError as error:
                problems.append(str(error))
    if problems:
        raise ValueError("the comparison was not started, these settings would fail: " + " | ".join(problems))


def _check_compare_types(compare: dict) -> None:
    for key, annotation in COMPARE_TYPES.items():
        if key in compare and (problem := type_problem(compare[key], annotation)) is not None:
            value = compare[key]
            raise ValueError(f"compare.{key}: {problem}, got {type(value).__name__} {value!r}")


def _arm_setting(kind: str, config: dict, key: str):
    """``config[key]``, else the default of the arm's config class (``ESConfig`` or TRL's ``GRPOConfig``)."""
    if key in config:
        return config[key]
    return next(f.default for f in dataclasses.fields(ESConfig if kind == "es" else GRPOConfig) if f.name == key)


def rollouts_per_step(kind: str, config: dict, arm: str | None = None) -> int:
    """Completions one optimizer step generates on one process, from the arm's settings.

    ES: each member completes the distinct prompts of its prompt group (once under greedy decoding,
    ``num_generations`` times when sampling), i.e. ``population_size x distinct / prompt_groups``, plus one
    generation of the distinct prompts by the unperturbed model with ``log_frac_changed_completions``. GRPO: one
    generation batch serves ``num_iterations`` optimizer steps.
    """

    def get(key):
        return _arm_setting(kind, config, key)

    rows = get("per_device_train_batch_size") * get("gradient_accumulation_steps")
    if kind == "es":
        distinct = rows // get("num_generations") if get("temperature") == 0 else rows
        groups = get("prompt_groups")
        if distinct % groups:
            raise ValueError(
                f"{arm or 'es'} arm: prompt_groups={groups} does not divide the {distinct} prompt rows of a step "
                "(per_device_train_batch_size x gradient_accumulation_steps, / num_generations under greedy decoding)"
            )
        extra = distinct if get("log_frac_changed_completions") else 0
        return get("population_size") * distinct // groups + extra
    return max(1, rows // get("num_iterations"))


def _apply_overrides(recipe: dict, overrides: dict) -> dict:
    """``--key value`` (top level), ``--section.key value`` and ``--variants.NAME.key value`` into the recipe."""
    recipe = {key: (dict(value or {}) if key in SECTIONS else value) for key, value in recipe.items()}
    if VARIANTS in recipe:
        recipe[VARIANTS] = {name: dict(keys or {}) for name, keys in recipe[VARIANTS].items()}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section == VARIANTS:
            variant, _, setting = name.partition(".")
            if not variant or not setting:
                raise ValueError(
                    f"--{key}: a variant setting is --variants.NAME.KEY VALUE (e.g. --variants.big.sigma 0.02)"
                )
            recipe.setdefault(VARIANTS, {}).setdefault(variant, {})[setting] = value
        elif name and section in SECTIONS:
            recipe.setdefault(section, {})[name] = value
        else:
            recipe[key] = value
    return recipe


def _check_arm_section(where: str, section: dict, shared_names: set[str]) -> None:
    misplaced = sorted(set(section) & (shared_names - set(PER_ARM_MODEL_KEYS)))
    if misplaced:
        raise ValueError(
            f"{where}: {misplaced} are shared by every arm (the same data, rewards, held-out and validation splits, "
            f"seeds and evaluation make the arms comparable); set them at the top level. An arm may set only "
            f"{list(PER_ARM_MODEL_KEYS)} for itself."
        )


def _grid_points(name: str, kind: str, config: dict, entry) -> list[dict]:
    """An arm's grid: a list (learning rates), a mapping ``{key: [values]}`` (every combination), or by default its
    step size x GRID_FACTORS (``cma_sigma0`` for CMA-ES, which has no learning rate)."""
    if entry is None:
        key = "cma_sigma0" if kind == "es" and _arm_setting(kind, config, "strategy") == "cma" else "learning_rate"
        centre = _arm_setting(kind, config, key)
        if centre is None:  # an ES arm's unset learning rate: the one ESConfig derives from its sigma
            settings = ("sigma", "population_size", "fitness_shaping", "optim")
            centre = derived_learning_rate(*(_arm_setting(kind, config, setting) for setting in settings))
        entry = {key: [centre * factor for factor in GRID_FACTORS]}
    elif isinstance(entry, list):
        entry = {"learning_rate": entry}
    if not isinstance(entry, dict) or not entry or not all(isinstance(v, list) and v for v in entry.values()):
        raise ValueError(
            f"compare.grid.{name}: give a list of learning rates or a mapping of setting -> list of values, "
            f"got {entry!r}"
        )
    keys = list(entry)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*entry.values())]


def make_plan(recipe: dict, overrides: dict | None = None, arms: list[str] | None = None) -> ComparePlan:
    """Split a recipe (plus ``--key value`` overrides) into the shared keys and each arm's keys, and fix the budget.

    ``arms``: run only these arms (names: ``es``, ``grpo`` and the variants), in this order.
    """
    recipe = _apply_overrides(recipe, overrides or {})
    shared_names = _script_and_model_keys() | set(SHARED_TRAINING_KEYS)
    shared = {key: value for key, value in recipe.items() if key in shared_names}
    es = {key: value for key, value in recipe.items() if key not in shared_names and key not in SECTIONS}
    es.pop("output_dir", None)
    _check_arm_section("es section", recipe.get("es") or {}, shared_names)
    es.update(recipe.get("es") or {})
    grpo = dict(recipe.get("grpo") or {})
    _check_arm_section("grpo section", grpo, shared_names)
    misplaced = sorted(set(grpo) & _es_only_keys() - set(GRPO_ENGINE_KEYS))
    if misplaced:
        raise ValueError(f"grpo section: {misplaced} are ES fields; GRPOConfig has no such fields.")
    variants = recipe.get(VARIANTS) or {}
    for name, keys in variants.items():
        if not isinstance(name, str) or not ARM_NAME.match(name) or name in ("es", "grpo"):
            raise ValueError(
                f"variants: {name!r} is not a usable arm name (letters, digits, '_' or '-', starting with a letter; "
                "not 'es' or 'grpo')"
            )
        if not isinstance(keys, dict):
            raise ValueError(f"variants.{name} must be a mapping of ES settings, got {type(keys).__name__}")
        _check_arm_section(f"variants.{name}", keys, shared_names)
    compare = dict(recipe.get("compare") or {})
    if set(compare) - set(COMPARE_KEYS):
        raise ValueError(
            f"compare section: unknown keys {sorted(set(compare) - set(COMPARE_KEYS))}; known: {sorted(COMPARE_KEYS)}"
        )
    _check_compare_types(compare)

    configs = {"es": {**ARM_DEFAULTS, **es}}
    configs.update({name: {**ARM_DEFAULTS, **es, **keys} for name, keys in variants.items()})
    configs["grpo"] = {**ARM_DEFAULTS, **grpo}
    kinds = {name: "grpo" if name == "grpo" else "es" for name in configs}
    wanted = arms if arms is not None else compare.get("arms")
    if wanted is not None:
        unknown = [name for name in wanted if name not in configs]
        if unknown or not wanted:
            raise ValueError(f"arms {unknown or wanted}: choose from {list(configs)}")
        configs = {name: configs[name] for name in wanted}
    # Types first: the budget below is arithmetic on these values (a string would fail as a bare TypeError).
    _check_arm_types("shared settings", "es", shared)
    for name, config in {"es": configs.get("es", es), **configs}.items():
        _check_arm_types(_arm_label(name), kinds[name], config)

    budget_rollouts = compare.get("budget_rollouts")
    if budget_rollouts is None:
        # Default: the ES arm's own recipe (max_steps ES steps) sets the budget every arm gets.
        if "max_steps" not in es or es["max_steps"] <= 0:
            raise ValueError("set compare.budget_rollouts, or max_steps for the ES arm, to fix the rollout budget")
        budget_rollouts = es["max_steps"] * rollouts_per_step("es", es)
    if budget_rollouts <= 0:
        raise ValueError(f"compare.budget_rollouts must be > 0, got {budget_rollouts}")
    budget_seconds = compare.get("budget_seconds")
    if budget_seconds is not None and budget_seconds <= 0:
        raise ValueError(f"compare.budget_seconds must be > 0, got {budget_seconds}")
    eval_points = int(compare.get("eval_points", 10))
    if eval_points < 1:
        raise ValueError(f"compare.eval_points must be >= 1, got {eval_points}")
    validation_size = compare.get("validation_size")
    if validation_size is not None:
        if not isinstance(validation_size, int) or validation_size < 1:
            raise ValueError(f"compare.validation_size must be a number of rows >= 1, got {validation_size!r}")
        if shared.get("dataset_validation_size") not in (None, validation_size):
            raise ValueError(
                f"compare.validation_size={validation_size} and dataset_validation_size="
                f"{shared['dataset_validation_size']} disagree; set one"
            )
        shared["dataset_validation_size"] = validation_size
    validation_size = shared.get("dataset_validation_size")

    for name, config in configs.items():
        # Each arm's LR schedule spans the budget: max_steps is the number of its steps the budget pays for.
        config["max_steps"] = math.ceil(budget_rollouts / rollouts_per_step(kinds[name], config, name))
    grid = compare.get("grid") or {}
    unknown = sorted(set(grid) - set(configs) - set(variants) - {"es", "grpo"})
    if unknown:
        raise ValueError(f"compare.grid: no arm named {unknown}; arms: {list(configs)}")
    grids = {name: _grid_points(name, kinds[name], config, grid.get(name)) for name, config in configs.items()}
    return ComparePlan(
        shared,
        configs,
        int(budget_rollouts),
        budget_seconds,
        eval_points,
        grids,
        {name: kinds[name] for name in configs},
        {name: dict(keys) for name, keys in variants.items() if name in configs},
        validation_size,
    )
