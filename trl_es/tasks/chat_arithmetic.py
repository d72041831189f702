"""Chat arithmetic for a real instruct model: ``"What is 47+38? Answer with the number only."`` -> ``"85"``.

The task of ``builtin:smollm2-135m-instruct`` (dataset ``builtin:chat_arithmetic``). Why this task: it is verifiable
exactly, needs no hub, and SmolLM2-135M-Instruct starts with real headroom: its greedy chat answers are right for
about one sum in five (19% on 32 random sums), inside the 10-50% band where both GRPO's sampled groups and ES's
perturbed members see rewards that differ. The problems and splits are those of ``builtin:arithmetic`` (the same
8,100 sums, the same 1,000 held-out ``test`` problems, ``validation`` = the last 500 of ``train``), in TRL's
conversational format: each prompt is one user message, and the model's chat template adds its system prompt.

The reward reads the **last number** of the answer: the model often writes ``"71 + 55 = 126"`` rather than the bare
number, and the last number is its final claim. Words, units and a trailing period are ignored; no number is 0.
"""

import re
from pathlib import Path

from datasets import Dataset

from .arithmetic import arithmetic_problems


QUESTION = "What is {a}+{b}? Answer with the number only."
# ESSA's warm start on this task: a LoRA adapter for builtin:smollm2-135m-instruct after a brief SFT
# (``python -m benchmarks.build_policy --lora --lora_task chat_arithmetic``), shipped as builtin:smollm2-chat-lora.
SMOLLM2_CHAT_LORA_DIR = Path(__file__).resolve().parent.parent / "assets" / "smollm2-chat-lora"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*")


def chat_arithmetic_dataset(split: str = "train", size: int | None = None) -> Dataset:
    """Columns ``prompt`` (``[{"role": "user", "content": question}]``) and ``answer`` (the sum as a string)."""
    problems = arithmetic_problems(split, size)
    prompts = [[{"role": "user", "content": QUESTION.format(a=a, b=b)}] for a, b in problems]
    return Dataset.from_dict({"prompt": prompts, "answer": [str(a + b) for a, b in problems]})


def last_number(text: str) -> int | None:
    """The last integer written in ``text`` (thousands commas allowed), or None."""
    numbers = _NUMBER.findall(text)
    return int(numbers[-1].replace(",", "")) if numbers else None


def chat_arithmetic_accuracy(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's last number equals the ``answer`` column, else 0.0 (TRL reward-function signature;
    completions are conversational ``[{"role": "assistant", "content": ...}]`` or plain text)."""
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) and completion else completion or ""
        rewards.append(float(last_number(text) == int(gold)))
    return rewards
