"""From one recipe to two arms on the same budget (no model is loaded here).

A recipe is an ES training recipe plus three optional sections::

    model_name_or_path: ...        # shared: script and model keys, and SHARED_TRAINING_KEYS
    dataset_name: ...
    learning_rate: 4.0e-4          # every other top-level key belongs to the ES arm (a train recipe is an ES recipe)
    es: {...}                      # optional: more ES-arm settings (win over top-level keys)
    grpo: {...}                    # the GRPO arm's own settings, on top of TRL's GRPOConfig defaults
    compare: {budget_rollouts: ..., budget_seconds: ..., eval_points: ..., grid: {es: [...], grpo: [...]}}

``trl-es train`` reads the same file and ignores ``grpo`` and ``compare`` (``es`` is merged in); the format
itself (loading, overrides) lives in ``trl_es/recipes.py``.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from trl import GRPOConfig, ModelConfig

from ..config import ESConfig
from ..recipes import SECTIONS, ESScriptArguments


# Training keys that define the task or the measurement rather than an algorithm: both arms use the same value.
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
# Both arms otherwise start from their config class's defaults: for GRPO that is TRL's GRPOConfig (DAPO loss, beta=0,
# 8 generations, temperature 1, AdamW). These only keep a comparison run quiet and free of checkpoints. Learning rate
# and batch belong in the recipe's `grpo:` section: TRL's default learning rate (1e-6) is tuned for billion-parameter
# models.
ARM_DEFAULTS = {"save_strategy": "no", "report_to": "none", "disable_tqdm": True}
GRID_FACTORS = (0.5, 1.0, 2.0)


@dataclass
class ComparePlan:
    """Everything the harness needs: shared keys, each arm's keys, and the budget."""

    shared: dict
    arms: dict[str, dict]
    budget_rollouts: int
    budget_seconds: float | None
    eval_points: int
    grids: dict[str, list[float]] = field(default_factory=dict)

    def eval_every_rollouts(self) -> int:
        return max(1, math.ceil(self.budget_rollouts / self.eval_points))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _script_and_model_keys() -> set[str]:
    return {f.name for cls in (ESScriptArguments, ModelConfig) for f in dataclasses.fields(cls)}


def _es_only_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(ESConfig)} - {f.name for f in dataclasses.fields(GRPOConfig)}


def _arm_setting(arm: str, config: dict, key: str):
    """``config[key]``, else the default of the arm's config class (``ESConfig`` or TRL's ``GRPOConfig``)."""
    if key in config:
        return config[key]
    return next(f.default for f in dataclasses.fields(ESConfig if arm == "es" else GRPOConfig) if f.name == key)


def rollouts_per_step(arm: str, config: dict) -> int:
    """Completions one optimizer step generates on one process, from the arm's settings.

    ES: every member completes each distinct prompt (once under greedy decoding, ``num_generations`` times when
    sampling). GRPO: one generation batch serves ``num_iterations`` optimizer steps.
    """

    def get(key):
        return _arm_setting(arm, config, key)

    rows = get("per_device_train_batch_size") * get("gradient_accumulation_steps")
    if arm == "es":
        distinct = rows // get("num_generations") if get("temperature") == 0 else rows
        return get("population_size") * distinct
    return max(1, rows // get("num_iterations"))


def make_plan(recipe: dict, overrides: dict | None = None) -> ComparePlan:
    """Split a recipe (plus ``--key value`` overrides) into the shared keys and each arm's keys, and fix the budget."""
    recipe = {key: (dict(value) if key in SECTIONS else value) for key, value in recipe.items()}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if name and section in SECTIONS:
            recipe.setdefault(section, {})
            recipe[section] = {**(recipe[section] or {}), name: value}
        else:
            recipe[key] = value
    shared_names = _script_and_model_keys() | set(SHARED_TRAINING_KEYS)
    shared = {key: value for key, value in recipe.items() if key in shared_names}
    es = {key: value for key, value in recipe.items() if key not in shared_names and key not in SECTIONS}
    es.pop("output_dir", None)
    es.update(recipe.get("es") or {})
    grpo = dict(recipe.get("grpo") or {})
    misplaced = sorted(set(grpo) & _es_only_keys())
    if misplaced:
        raise ValueError(f"grpo section: {misplaced} are ES fields; GRPOConfig has no such fields.")
    compare = dict(recipe.get("compare") or {})
    known = {"budget_rollouts", "budget_seconds", "eval_points", "grid"}
    if set(compare) - known:
        raise ValueError(f"compare section: unknown keys {sorted(set(compare) - known)}; known: {sorted(known)}")

    es_per_step = rollouts_per_step("es", es)
    budget_rollouts = compare.get("budget_rollouts")
    if budget_rollouts is None:
        # Default: the ES arm's own recipe (max_steps ES steps) sets the budget both arms get.
        if "max_steps" not in es or es["max_steps"] <= 0:
            raise ValueError("set compare.budget_rollouts, or max_steps for the ES arm, to fix the rollout budget")
        budget_rollouts = es["max_steps"] * es_per_step
    if budget_rollouts <= 0:
        raise ValueError(f"compare.budget_rollouts must be > 0, got {budget_rollouts}")
    budget_seconds = compare.get("budget_seconds")
    if budget_seconds is not None and budget_seconds <= 0:
        raise ValueError(f"compare.budget_seconds must be > 0, got {budget_seconds}")
    eval_points = int(compare.get("eval_points", 10))
    if eval_points < 1:
        raise ValueError(f"compare.eval_points must be >= 1, got {eval_points}")

    arms = {"es": {**ARM_DEFAULTS, **es}, "grpo": {**ARM_DEFAULTS, **grpo}}
    for name, config in arms.items():
        # Each arm's LR schedule spans the budget: max_steps is the number of its steps the budget pays for.
        config["max_steps"] = math.ceil(budget_rollouts / rollouts_per_step(name, config))
    grid = compare.get("grid") or {}
    grids = {}
    for name, config in arms.items():
        base = _arm_setting(name, config, "learning_rate")
        grids[name] = [float(lr) for lr in grid.get(name, [base * f for f in GRID_FACTORS])]
    return ComparePlan(shared, arms, int(budget_rollouts), budget_seconds, eval_points, grids)
