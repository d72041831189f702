"""Checks on the data a run trains on: what a dataset must hold, and what the model can take of it.

Refused before any model is loaded: a dataset without a ``prompt`` column, or with image columns
(:func:`check_prompt_column`). Warned about, once each, because GRPO runs them silently and ES follows GRPO there: a
train dataset too small for one step (GRPO's sampler keeps whole batches only, so no step is made;
:func:`warn_if_smaller_than_one_step`), and prompts too long for the model's context (:class:`ContextCheck`).
"""

import warnings

from datasets import IterableDataset


def check_prompt_column(dataset, name: str, environment_owns_prompts: bool = False) -> None:
    """Fail before any model is loaded when a dataset has no ``prompt`` column (optional when an environment's
    ``reset()`` supplies the prompt, as in GRPO) or has image columns."""
    if dataset is None:
        return
    if isinstance(dataset, dict):  # DatasetDict or {name: dataset} for eval
        for key, value in dataset.items():
            check_prompt_column(value, f"{name}[{key!r}]", environment_owns_prompts)
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None and isinstance(dataset, IterableDataset):
        first = next(iter(dataset), None)
        columns = list(first) if first is not None else []
    for column in ("image", "images"):
        if columns is not None and column in columns:
            raise ValueError(
                f"{name} has an {column!r} column: ESTrainer does not train vision-language models yet (GRPOTrainer "
                "would pass the images to generation; ES would silently train text-only). Drop the column to train on "
                "the text prompts alone."
            )
    if columns is not None and "prompt" not in columns and not environment_owns_prompts:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {sorted(columns)}). ESTrainer, like GRPOTrainer, reads the "
            "prompts from a column named 'prompt'; rename yours, e.g. dataset.rename_column('question', 'prompt')."
        )


def warn_if_smaller_than_one_step(dataset, args, num_generations: int) -> None:
    """Warn when ``dataset`` holds fewer prompts than one step takes: GRPO's sampler yields whole generation batches
    only, so training would end at step 0 with the weights unchanged (and transformers' message blames an
    ``IterableDataset``). Datasets without a length are not checked."""
    try:
        size = len(dataset)
    except TypeError:
        return
    per_step = args.generation_batch_size // num_generations
    if size < per_step:
        warnings.warn(
            f"train_dataset has {size} prompts, fewer than the {per_step} one ES step takes (generation_batch_size="
            f"{args.generation_batch_size} rows / num_generations={num_generations}): GRPO's sampler keeps only whole "
            "batches, so training makes no step. Add prompts, or lower per_device_train_batch_size (or "
            "gradient_accumulation_steps).",
            UserWarning,
            stacklevel=3,
        )


def context_length(model) -> int | None:
    """The model's context: ``max_position_embeddings`` of its (text) config, or None when it declares none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


class ContextCheck:
    """Warns once per run when a step's prompts leave no room in the model's context for ``max_completion_length``
    completion tokens: positions past ``max_position_embeddings`` are outside what the model was trained on, and
    generation goes on there without an error (transformers says so in a log line that names no prompt)."""

    def __init__(self, model, max_completion_length: int | None):
        self.limit = context_length(model)
        self.completion = max_completion_length or 0
        self.warned = self.limit is None

    def check(self, step: int, prompt_ids: list) -> None:
        """``prompt_ids``: the token ids of the prompts just generated from (repeats counted once)."""
        if self.warned:
            return
        room = self.limit - self.completion
        prompts = {tuple(ids) for ids in prompt_ids}
        too_long = [len(ids) for ids in prompts if len(ids) > room]
        if not too_long:
            return
        self.warned = True
        warnings.warn(
            f"ES step {step}: {len(too_long)} of its {len(prompts)} prompts do not fit the model's context "
            f"(max_position_embeddings={self.limit}) with max_completion_length={self.completion}: a prompt may have "
            f"at most {room} prompt tokens, the longest has {max(too_long)}. The model generates past its context "
            "without an error, so these rewards score unreliable completions. Shorten or filter the prompts, or lower "
            "max_completion_length. (Said once per run.)",
            UserWarning,
            stacklevel=2,
        )
