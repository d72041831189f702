"""Every use of ``GRPOTrainer``'s private internals, in one place.

ESTrainer reuses GRPO's generation (``_generate``: transformers, paged or vLLM, tools and environments) and reward
code (``_calculate_rewards``) instead of copying them. Those are private and change between TRL releases, so nothing
else in ``trl_es`` touches them: a TRL upgrade that moves one breaks :func:`check_trl_internals` (called when the
trainer is built, and pinned by ``tests/test_trl_compat.py``) with a message naming what moved, instead of failing
in the middle of a training loop.
"""

import trl


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
}
# ``_generate`` returns (prompt_ids, completion_ids, tool_mask, completions, ...): the positions read below.
GENERATE_COMPLETION_IDS, GENERATE_COMPLETIONS = 1, 3


def check_trl_internals(trainer) -> None:
    missing = [
        f"{name} ({why})"
        for name, why in {**REQUIRED_METHODS, **REQUIRED_ATTRIBUTES}.items()
        if not hasattr(trainer, name)
    ]
    if missing:
        raise RuntimeError(
            f"ESTrainer needs GRPOTrainer internals that trl {trl.__version__} does not have: {missing}. "
            "trl_es is tested with trl 1.16; pin `trl>=1.16,<2` or update trl_es/trl_compat.py."
        )


def generate(trainer, prompts: list) -> tuple[list[list[int]], list]:
    """``(completion_ids, completions)`` for ``prompts``, through GRPO's own generation backend."""
    outputs = trainer._generate(prompts)
    if not isinstance(outputs, tuple) or len(outputs) <= GENERATE_COMPLETIONS:
        raise RuntimeError(
            f"GRPOTrainer._generate in trl {trl.__version__} returned {type(outputs).__name__} of length "
            f"{len(outputs) if isinstance(outputs, tuple) else '?'}; trl_es expects (prompt_ids, completion_ids, "
            "tool_mask, completions, ...). Update trl_es/trl_compat.py."
        )
    return outputs[GENERATE_COMPLETION_IDS], outputs[GENERATE_COMPLETIONS]


def calculate_rewards(trainer, rows: list[dict], prompts: list, completions: list, completion_ids: list):
    """Rewards ``(processes * len(rows), reward functions)``, rank-major, fp32; NaN where a function gave None."""
    return trainer._calculate_rewards(rows, prompts, completions, completion_ids).float()


def force_weight_sync(trainer) -> None:
    """GRPO pushes weights to vLLM once per optimizer step; ES changes them once per member, so force a push."""
    if trainer.use_vllm:
        trainer._last_loaded_step = -1


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
