"""Built-in verifiable tasks and the tiny policies trained on them (the offline embedded default)."""

from .arithmetic import ARITHMETIC_LORA_DIR, ARITHMETIC_POLICY_DIR, arithmetic_accuracy, arithmetic_dataset
from .chat_arithmetic import SMOLLM2_CHAT_LORA_DIR, chat_arithmetic_accuracy, chat_arithmetic_dataset
from .hub_tasks import countdown_reward


__all__ = [
    "ARITHMETIC_LORA_DIR",
    "ARITHMETIC_POLICY_DIR",
    "SMOLLM2_CHAT_LORA_DIR",
    "arithmetic_accuracy",
    "arithmetic_dataset",
    "chat_arithmetic_accuracy",
    "chat_arithmetic_dataset",
    "countdown_reward",
]
