"""Every use of ``GRPOTrainer``'s private internals, in one place.

ESTrainer reuses GRPO's generation (``_generate``: transformers, paged or vLLM, tools and environments) and reward
code (``_calculate_rewards``) instead of copying them. Those are private and change between TRL releases, so nothing
else in ``trl_es`` touches them: a TRL upgrade that moves one breaks :func:`check_trl_internals` (called when the
trainer is built, and pinned by ``tests/test_trl_compat.py``) with a message naming what moved, instead of failing
in the middle of a training loop.

GRPO prepares tools and environments per batch inside ``_generate_and_score_completions``, which ES never calls (it
generates once per member group). :func:`prepare_rollouts` does that per-batch setup for one ES generation block.
"""

import contextlib
import inspect
import random

import numpy as np
import torch
import trl
from trl import GRPOTrainer


# What ESTrainer relies on, and why. Attributes are looked up on a built trainer.
REQUIRED_METHODS = {
    "_generate": "generates completions for a list of prompts",
    "_calculate_rewards": "scores completions with every reward function (sync, async and model rewards)",
}
REQUIRED_ATTRIBUTES = {
    "_pending_extra_logs": "per-completion columns reward functions send through `log_extra`",
    "_pending_metrics": "scalars reward functions send through `log_metric`",
    "_logs": "the completion table written by `log_completions`",
    "use_vllm": "whether weights must be pushed to a vLLM engine",
    "tools": "every tool exposed to the model (standalone and environment methods)",
    "_standalone_tools": "the tools not bound to an environment",
    "environment_factories": "{environment name: factory} from `environment_factory`, or None",
    "_multi_environment": "whether rows pick their environment by an `environment` column",
    "environments": "the per-rollout environment instances `_calculate_rewards` passes to reward functions",
    "rollout_func": "a user rollout function replacing GRPO's generation, or None",
    "_metrics": "{'train' | 'eval': {metric name: values}}, averaged and logged by GRPO's `log`",
    "aux_loss_enabled": "whether GRPO would add the MoE router load-balancing loss",
    "router_aux_loss_coef": "the weight of that loss",
}
# Private GRPOTrainer / transformers.Trainer methods that trl_es overrides or calls; were one renamed, an override
# would silently stop acting. tests/test_trl_compat.py checks that every private method ESTrainer (and the compare
# harness's trainers) override is listed here.
OVERRIDDEN_TRAINER_METHODS = {
    "_get_grad_norm": "the gradient norm Trainer logs, which reads p.grad (none with the in-place update)",
    "_save_checkpoint": "ES state, seed log and settings saved next to each checkpoint; Ctrl-C saves through it",
    "_load_from_checkpoint": "ES state (strategy, reference, anchor) and a finite-weights check on resume",
    "_generate": "the compare harness counts the rollouts and tokens every training-time generation produced",
}
# Only there when `environment_factory` is given.
REQUIRED_ENVIRONMENT_ATTRIBUTES = {
    "_environment_pool": "{environment name: reusable instances}",
    "_env_tools": "{environment name: the tools its prompts are rendered with}",
}
# Set by GRPO's per-batch setup and read by `_generate` / `_tool_call_loop`; prepare_rollouts sets them instead, so
# a rename in TRL would leave them unset: check that GRPO's code still reads them under these names.
READ_BY_GENERATE = {
    "_batch_environments": "each rollout's environment name (which tool schema its prompt is rendered with)",
    "_sync_tool_dicts": "each rollout's sync tools by name",
    "_async_tool_dicts": "each rollout's async tools by name",
}
# ``_generate`` returns (prompt_ids, completion_ids, tool_mask, completions, ...): the positions read below.
GENERATE_PROMPT_IDS, GENERATE_COMPLETION_IDS, GENERATE_TOOL_MASK, GENERATE_COMPLETIONS = 0, 1, 2, 3
# GRPOConfig fields that make GRPOTrainer.__init__ load a reference model (beta != 0; with a PeftModel, a copy of its
# adapter named "ref") and register its SyncRefModelCallback (sync_ref_model), with the values that make it do neither.
GRPO_REFERENCE_FIELDS = {"beta": 0.0, "sync_ref_model": False}
# What GRPO generates from when a row has no prompt and an environment's `reset()` supplies it.
PLACEHOLDER_PROMPT = ({"role": "user", "content": ""},)


def check_trl_internals(trainer) -> None:
    required = {**REQUIRED_METHODS, **REQUIRED_ATTRIBUTES}
    if getattr(trainer, "environment_factories", None) is not None:
        required.update(REQUIRED_ENVIRONMENT_ATTRIBUTES)
    missing = [f"{name} ({why})" for name, why in required.items() if not hasattr(trainer, name)]
    missing += [
        f"{name} ({why})" for name, why in OVERRIDDEN_TRAINER_METHODS.items() if not hasattr(GRPOTrainer, name)
    ]
    if getattr(trainer, "tools", None):
        source = inspect.getsource(GRPOTrainer)
        missing += [
            f"{name} ({why}; no longer read by GRPO)" for name, why in READ_BY_GENERATE.items() if name not in source
        ]
    if missing:
        raise RuntimeError(
            f"ESTrainer needs GRPOTrainer internals that trl {trl.__version__} does not have: {missing}. "
            "trl_es is tested with trl 1.16; pin `trl>=1.16,<2` or update trl_es/trl_compat.py."
        )


def metrics(trainer, mode: str):
    """``{metric name: values}`` that GRPO's ``log`` averages and reports for ``mode`` ('train' or 'eval')."""
    return trainer._metrics[mode]


def save_checkpoint(trainer) -> None:
    """Save a resumable checkpoint of the current step, as Trainer does at a ``save_steps`` boundary."""
    trainer._save_checkpoint(trainer.model, trial=None)


def completion_ids_of(generate_output) -> list:
    """The completion token ids in what ``GRPOTrainer._generate`` returns."""
    return generate_output[GENERATE_COMPLETION_IDS]


def is_async_callable(func) -> bool:
    """Whether GRPO awaits ``func`` as a reward function (a coroutine function, or an object whose ``__call__`` is)."""
    from trl.trainer.utils import is_async_callable as check

    return check(func)


def create_model_from_path(path: str, **kwargs):
    """A model loaded the way GRPOTrainer loads a model id (dtype, device map and init kwargs)."""
    from trl.trainer.utils import create_model_from_path as create

    return create(path, **kwargs)


@contextlib.contextmanager
def grpo_builds_no_reference(args):
    """Hide ``beta`` and ``sync_ref_model`` from ``GRPOTrainer.__init__`` (restored afterwards).

    GRPO would load a second copy of the policy from disk (or add a "ref" adapter) and sync it after its own loss
    steps; ES keeps its own reference (``trl_es.reference``: a copy of the evolved tensors only, or the adapter
    disabled) and reads ``args.beta`` itself. GRPO reads these fields only while it is built: after that its
    ``self.beta`` stays 0, which nothing ES calls looks at.
    """
    saved = {name: getattr(args, name) for name in GRPO_REFERENCE_FIELDS}
    for name, value in GRPO_REFERENCE_FIELDS.items():
        setattr(args, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


def generate(trainer, prompts: list) -> tuple[list[list[int]], list]:
    """``(completion_ids, completions)`` for ``prompts``, through GRPO's own generation backend."""
    _, completion_ids, completions = rollout(trainer, prompts)
    return completion_ids, completions


def rollout(trainer, prompts: list) -> tuple[list[list[int]], list[list[int]], list]:
    """``(prompt_ids, completion_ids, completions)`` for ``prompts``, through GRPO's own generation backend (tool
    calls included: a completion's ids then hold the tool results too, as GRPO's do)."""
    prompt_ids, completion_ids, _, completions = rollout_with_tool_mask(trainer, prompts)
    return prompt_ids, completion_ids, completions


def rollout_with_tool_mask(trainer, prompts: list) -> tuple[list, list, list | None, list]:
    """``(prompt_ids, completion_ids, tool_mask, completions)``: :func:`rollout` plus, per completion, 1 for the
    tokens the model generated and 0 for tool results (``None`` when no tool or environment answered)."""
    outputs = trainer._generate(prompts)
    if not isinstance(outputs, tuple) or len(outputs) <= GENERATE_COMPLETIONS:
        raise RuntimeError(
            f"GRPOTrainer._generate in trl {trl.__version__} returned {type(outputs).__name__} of length "
            f"{len(outputs) if isinstance(outputs, tuple) else '?'}; trl_es expects (prompt_ids, completion_ids, "
            "tool_mask, completions, ...). Update trl_es/trl_compat.py."
        )
    return (
        outputs[GENERATE_PROMPT_IDS],
        outputs[GENERATE_COMPLETION_IDS],
        outputs[GENERATE_TOOL_MASK],
        outputs[GENERATE_COMPLETIONS],
    )


# ---------------------------------------------------------------------- tools and environments


def row_prompts(trainer, rows: list[dict]) -> list:
    """Each row's prompt; GRPO's empty user turn for a row without one when an environment owns the data."""
    if trainer.environment_factories is None:
        return [row["prompt"] for row in rows]
    return [row["prompt"] if "prompt" in row else list(PLACEHOLDER_PROMPT) for row in rows]


def rollouts_depend_only_on_rows(trainer) -> bool:
    """Whether a rollout is a function of its row alone (so greedy rollouts of repeated rows are identical).

    Tools and environments answer from outside the model (a sandbox, a clock, a random episode in ``reset``), and a
    ``rollout_func`` is user code: their repeats of one row are separate samples, not copies to de-duplicate.
    """
    return not trainer.tools and trainer.environment_factories is None and trainer.rollout_func is None


def prepare_rollouts(trainer, rows: list[dict], reset_seeds: list[int] | None = None) -> list:
    """GRPO's per-batch rollout setup for one generation block; returns the prompts to generate from.

    ``rows`` is the block (for ES: the step's prompt rows repeated once per member of the group, member-major); one
    rollout is generated per row. As GRPO does for a batch, this resolves each row's environment (``ValueError`` for
    a name ``environment_factory`` does not know), hands every rollout its own instance from GRPO's pool (creating
    instances when the block needs more than exist), builds the per-rollout tool dicts, calls ``reset(**row)`` on each
    instance and appends the observation it returns to the row's last message. The instances become
    ``trainer.environments``, which GRPO's reward code passes to reward functions as ``environments=``.

    Called once per block, before that block generates: every member therefore starts from freshly reset
    environments, never from the state another member's tool calls left behind, and instances are reused (reset
    again) by the next block, GRPO's "construct once, reset often".

    ``reset_seeds`` (one per row) seeds Python's ``random``, NumPy's and torch's global generators around that row's
    ``reset`` (restored afterwards), so an environment that draws its episode from them draws the same one for every
    member that completes the row: common random numbers, as for the prompts. An environment with its own generator
    is not reached by this.
    """
    prompts = row_prompts(trainer, rows)
    factories = trainer.environment_factories
    environments = None
    if factories is not None:
        names = [row.get("environment") if trainer._multi_environment else None for row in rows]
        for name in dict.fromkeys(names):
            if name not in factories:
                raise ValueError(
                    f"Example has `environment={name!r}`, which is not among the environments passed to "
                    f"`environment_factory`. Expected one of: {list(factories)}."
                )
        environments, handed_out = [], {}
        for name in names:
            pool, index = trainer._environment_pool[name], handed_out.get(name, 0)
            if index == len(pool):
                pool.append(factories[name]())
            handed_out[name] = index + 1
            environments.append(pool[index])
        trainer._batch_environments = names
        trainer.environments = environments
    if trainer.tools:
        trainer._sync_tool_dicts, trainer._async_tool_dicts = [], []
        for index in range(len(rows)):
            tools = list(trainer._standalone_tools)
            if environments:
                tools += _environment_methods(environments[index])
            trainer._sync_tool_dicts.append({t.__name__: t for t in tools if not inspect.iscoroutinefunction(t)})
            trainer._async_tool_dicts.append({t.__name__: t for t in tools if inspect.iscoroutinefunction(t)})
    for index, environment in enumerate(environments or []):
        row = rows[index]
        # In multi-environment mode `environment` only routes the row; GRPO does not hand it to `reset`.
        kwargs = {k: v for k, v in row.items() if k != "environment"} if trainer._multi_environment else row
        with _seeded_global_rngs(None if reset_seeds is None else reset_seeds[index]):
            observation = environment.reset(**kwargs)
        if observation is not None:
            prompts[index] = _with_observation(prompts[index], observation, type(environment).__name__)
    return prompts


def _environment_methods(environment) -> list:
    """The instance's public methods GRPO exposes as tools (listed on the class: properties are not evaluated)."""
    return [
        getattr(environment, name)
        for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]


def _with_observation(prompt, observation, environment: str):
    """The prompt with ``observation`` appended to its last message (a new list: the dataset row is not mutated)."""
    if isinstance(prompt, str) and isinstance(observation, str):
        return prompt + observation
    if isinstance(prompt, str) or not prompt or "content" not in prompt[-1]:
        raise ValueError(
            f"{environment}.reset() returned an observation ({type(observation).__name__}), which is appended to the "
            f"last message of a conversational prompt, but the prompt is {prompt!r}."
        )
    content = prompt[-1]["content"]
    # Text and content-block messages mix: turn whichever side is plain text into a text block.
    if isinstance(observation, list) and isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if isinstance(observation, str) and isinstance(content, list):
        observation = [{"type": "text", "text": observation}]
    return [*prompt[:-1], {**prompt[-1], "content": content + observation}]


@contextlib.contextmanager
def _seeded_global_rngs(seed: int | None):
    if seed is None:
        yield
        return
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def router_aux_loss_coef(trainer) -> float | None:
    """The MoE router load-balancing weight where GRPO would add that loss (a MoE model, weight not 0), else None."""
    return float(trainer.router_aux_loss_coef) if trainer.aux_loss_enabled else None


def calculate_rewards(trainer, rows: list[dict], prompts: list, completions: list, completion_ids: list):
    """Rewards ``(processes * len(rows), reward functions)``, rank-major, fp32; NaN where a function gave None."""
    return trainer._calculate_rewards(rows, prompts, completions, completion_ids).float()


def force_weight_sync(trainer) -> None:
    """GRPO pushes weights to vLLM once per optimizer step; ES changes them once per member, so force a push."""
    if trainer.use_vllm:
        trainer._last_loaded_step = -1


def sync_vllm_weights(trainer) -> None:
    """Push the trainer's weights to vLLM now (GRPO's own sync), and mark them pushed for this step so that GRPO's
    generation does not push again while the engine serves members built in it."""
    trainer.vllm_generation.sync_weights()
    trainer._last_loaded_step = trainer.state.global_step


def colocated_vllm(trainer):
    """The ``vllm.LLM`` GRPO built in this process (``vllm_mode="colocate"``), else None."""
    generation = getattr(trainer, "vllm_generation", None) if trainer.use_vllm else None
    return getattr(generation, "llm", None) if generation is not None and generation.mode == "colocate" else None


@contextlib.contextmanager
def vllm_engine_options(**options):
    """While GRPO builds its colocated engine, pass ``options`` to ``vllm.LLM`` too (GRPO sets neither the dtype,
    which vLLM then lowers from fp32 to 16 bits, nor prefix caching, which is on by default)."""
    from trl.generation import vllm_generation

    original = vllm_generation.LLM

    def build(*args, **kwargs):
        return original(*args, **{**kwargs, **options})

    vllm_generation.LLM = build
    try:
        yield
    finally:
        vllm_generation.LLM = original


def take_extra_logs(trainer) -> dict[str, list]:
    """The ``log_extra`` columns reward functions sent since the last call (then forgotten)."""
    logs = {column: list(values) for column, values in trainer._pending_extra_logs.items()}
    trainer._pending_extra_logs.clear()
    return logs


def take_logged_metrics(trainer) -> dict[str, list[float]]:
    """The ``log_metric`` values reward functions sent since the last call (then forgotten)."""
    metrics = {name: list(values) for name, values in trainer._pending_metrics.items()}
    trainer._pending_metrics.clear()
    return metrics


def log_completions(
    trainer, prompts: list, completions: list, rewards: dict[str, list], advantages: list, extra: dict
) -> None:
    """Append rows to the completion table GRPO prints and saves when ``log_completions`` is on."""
    table = trainer._logs
    table["prompt"].extend(prompts)
    table["completion"].extend(completions)
    for name, values in rewards.items():
        table["rewards"][name].extend(values)
    table["advantages"].extend(advantages)
    for column, values in extra.items():
        table["extra"][column].extend(values)
