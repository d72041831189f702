"""Published ES/GRPO benchmark tasks that need the Hugging Face Hub (GPU recipes): GSM8K and Countdown.

Both loaders turn the hub dataset into TRL's conversational ``prompt`` format plus the columns their reward reads.
Offline they fail with a message that says so (see ``load_hub_dataset``); nothing here runs in CI except the
reward function and that error.
"""

import ast
import operator
import re
from collections import Counter

from datasets import DatasetDict, load_dataset


def load_hub_dataset(repo_id: str, config: str | None = None) -> DatasetDict:
    try:
        return load_dataset(repo_id, config)
    except Exception as error:  # datasets raises several types when the hub is unreachable
        raise ConnectionError(
            f"Could not load the hub dataset {repo_id!r} ({type(error).__name__}: {error}). This recipe needs "
            "network access to the Hugging Face Hub, or a local copy in the HF cache (HF_DATASETS_OFFLINE=1)."
        ) from error


def gsm8k(prompt_suffix: str = "Reason step by step, then put the final answer in \\boxed{}.") -> DatasetDict:
    """``openai/gsm8k`` (main): ``prompt`` (one user message) and ``solution`` (the number after ``####``), the
    columns ``trl.rewards.accuracy_reward`` reads."""

    def convert(row):
        return {
            "prompt": [{"role": "user", "content": f"{row['question']}\n{prompt_suffix}"}],
            "solution": row["answer"].split("####")[-1].strip().replace(",", ""),
        }

    data = load_hub_dataset("openai/gsm8k", "main")
    return data.map(convert, remove_columns=["question", "answer"])


COUNTDOWN_INSTRUCTION = (
    "Using each of the numbers {nums} exactly once, with + - * / and parentheses, write an expression that equals "
    "{target}. Think it through in <think> </think>, then give only the expression in <answer> </answer>."
)


def countdown(test_size: int = 500, seed: int = 0) -> DatasetDict:
    """``Jiayi-Pan/Countdown-Tasks-3to4`` (the task of Qiu et al. 2025): ``prompt``, ``nums``, ``target``, with a
    deterministic held-out ``test`` split of ``test_size`` problems."""

    def convert(row):
        text = COUNTDOWN_INSTRUCTION.format(nums=row["nums"], target=row["target"])
        return {"prompt": [{"role": "user", "content": text}]}

    data = load_hub_dataset("Jiayi-Pan/Countdown-Tasks-3to4")["train"].map(convert)
    return data.train_test_split(test_size=test_size, seed=seed)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node):
    """Evaluate +, -, *, / over integer literals only (no names, calls or powers: never Python's eval)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    raise ValueError("unsupported expression")


def _countdown_score(text: str, nums, target) -> float:
    answers = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if not answers:
        return 0.0
    expression = answers[-1].strip()
    if not expression or not re.fullmatch(r"[\d\s+\-*/().]+", expression):
        return 0.0
    used = Counter(int(n) for n in re.findall(r"\d+", expression))
    if used != Counter(int(n) for n in nums):
        return 0.0
    try:
        value = _evaluate(ast.parse(expression, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    return float(abs(value - float(target)) < 1e-6)


def countdown_reward(completions, nums, target, **kwargs) -> list[float]:
    """1.0 when the last ``<answer>`` uses every number exactly once and evaluates to ``target``."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [_countdown_score(t, n, g) for t, n, g in zip(texts, nums, target, strict=True)]
