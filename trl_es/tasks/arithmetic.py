"""Two-digit addition, ``"47+38="`` -> ``"85"``: the offline task every default, test and CI run uses.

All 8,100 problems ``a+b=`` with ``10 <= a, b <= 99`` are shuffled once with a fixed seed; the first
``HELD_OUT_SIZE`` form the held-out ``test`` split and the rest the ``train`` split, so the splits are disjoint and
identical on every machine. The reward is exact numeric equality checked with math-verify.

The ``validation`` split is the last ``VALIDATION_SIZE`` problems of ``train``: disjoint from ``test``, from the same
distribution as training. It is *inside* ``train`` (kept whole so that every recipe's prompt stream and the shipped
policy's build stay as they were); a run that selects settings on it carves it out of its training data with
``dataset_validation_size: 500`` (``trl-es compare``'s ``compare.validation_size``), which removes exactly these rows.
The shipped policy was fine-tuned on all of ``train``, these rows included: its greedy accuracy on ``validation`` is
0.426, on the first 500 ``test`` problems 0.362.
"""

import random
from pathlib import Path

from datasets import Dataset


HELD_OUT_SIZE = 1000
VALIDATION_SIZE = 500
_SPLIT_SEED = 1234
# The small Qwen2-style policy shipped with the package (built by ``python -m benchmarks.build_policy``).
ARITHMETIC_POLICY_DIR = Path(__file__).resolve().parent.parent / "assets" / "arithmetic-policy"
# ESSA's warm start for it: a rank-4 LoRA adapter on q/k/v/o after a brief SFT (``build_policy --lora``). Load with
# ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ARITHMETIC_POLICY_DIR), ARITHMETIC_LORA_DIR)``.
ARITHMETIC_LORA_DIR = ARITHMETIC_POLICY_DIR.parent / "arithmetic-lora"


def _all_problems() -> list[tuple[int, int]]:
    problems = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(_SPLIT_SEED).shuffle(problems)
    return problems


def arithmetic_problems(split: str = "train", size: int | None = None) -> list[tuple[int, int]]:
    """The ``(a, b)`` pairs of a split: ``"train"``, ``"test"`` (the held-out problems) or ``"validation"`` (the
    last ``VALIDATION_SIZE`` problems of ``train``, in ``train``'s order); ``size`` keeps the first ``size``."""
    problems = _all_problems()
    if split == "test":
        problems = problems[:HELD_OUT_SIZE]
    elif split == "train":
        problems = problems[HELD_OUT_SIZE:]
    elif split == "validation":
        problems = problems[-VALIDATION_SIZE:]
    else:
        raise ValueError(f"unknown split {split!r}: use 'train', 'validation' or 'test'")
    if size is not None:
        if size > len(problems):
            raise ValueError(f"split {split!r} has {len(problems)} problems, {size} requested")
        problems = problems[:size]
    return problems


def arithmetic_dataset(split: str = "train", size: int | None = None, conversational: bool = False) -> Dataset:
    """Columns ``prompt`` (text, or a one-message conversation) and ``answer`` (the sum as a string).

    Args:
        split: ``"train"``, ``"test"`` or ``"validation"`` (see ``arithmetic_problems``).
        size: keep only the first ``size`` problems of the split (deterministic).
        conversational: emit ``[{"role": "user", "content": "47+38="}]`` prompts instead of plain text.
    """
    problems = arithmetic_problems(split, size)
    prompts = [f"{a}+{b}=" for a, b in problems]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    return Dataset.from_dict({"prompt": prompts, "answer": [str(a + b) for a, b in problems]})


def _completion_text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return completion[-1]["content"] if completion else ""
    return completion


def _is_correct(text: str, answer: str) -> bool:
    text = text.strip()
    if text.isdigit():  # the common case, decided without sympy (math-verify would agree and is ~100x slower)
        return int(text) == int(answer)
    if not text:
        return False
    from math_verify import parse, verify

    # parsing_timeout=None: math-verify's timeout uses signal.alarm, which only works on the main thread.
    gold = parse(answer, parsing_timeout=None)
    predicted = parse(text, parsing_timeout=None)
    return bool(predicted) and verify(gold, predicted, timeout_seconds=None)


def arithmetic_accuracy(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's number equals the ``answer`` column, else 0.0 (TRL reward-function signature)."""
    return [float(_is_correct(_completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]
