"""Built-in verifiable tasks and the tiny policies trained on them (the offline embedded default)."""

from .arithmetic import ARITHMETIC_POLICY_DIR, arithmetic_accuracy, arithmetic_dataset


__all__ = ["ARITHMETIC_POLICY_DIR", "arithmetic_accuracy", "arithmetic_dataset"]
