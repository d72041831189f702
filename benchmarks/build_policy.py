"""Build the embedded default policy: a byte-level tokenizer and a ~0.6M-parameter Qwen2-style model, trained
with TRL's ``SFTTrainer`` on the arithmetic train split until it is *partly* right.

Training stops as soon as greedy held-out accuracy reaches ``--target_accuracy`` (measured every
``--eval_every`` steps), because the partial-accuracy window of such a small model is narrow: a fixed step count
lands anywhere between 5% and 95% on different machines. The result ships in ``trl_es/assets/arithmetic-policy``
so every machine starts ES from the same weights; rerun this to rebuild it (~1-3 minutes on 2 CPU cores)::

    python -m benchmarks.build_policy --output_dir trl_es/assets/arithmetic-policy

``--lora`` builds ESSA's warm start instead (Gorbatovski et al. 2025: a LoRA adapter briefly SFT-trained before its
singular values are evolved): a rank-4 adapter on the attention projections of the shipped policy, trained for one
epoch on a few hundred train problems, saved as ``trl_es/assets/arithmetic-lora`` (~10 s on 2 idle cores)::

    python -m benchmarks.build_policy --lora --output_dir trl_es/assets/arithmetic-lora

``--lora --lora_task chat_arithmetic`` builds the same kind of warm start for the real model,
builtin:smollm2-135m-instruct, on chat arithmetic (conversational SFT rows: the user's question, the assistant's
bare number), saved as ``trl_es/assets/smollm2-chat-lora`` (builtin:smollm2-chat-lora). It is shipped rather than
rebuilt because SFT's numbers differ between CPU kinds, and every machine must evolve the same adapter; its
build_info.json records the base weights' hash it fits.
"""

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

from trl_es import evaluation
from trl_es.builtin_models import BUILTIN, resolve_model, weights_sha256
from trl_es.tasks.arithmetic import (
    ARITHMETIC_LORA_DIR,
    ARITHMETIC_POLICY_DIR,
    VALIDATION_SIZE,
    arithmetic_accuracy,
    arithmetic_dataset,
    arithmetic_problems,
)
from trl_es.tasks.chat_arithmetic import SMOLLM2_CHAT_LORA_DIR, chat_arithmetic_accuracy, chat_arithmetic_dataset


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level vocabulary with no merges: one token per byte, so every digit is its own token.

    With no merges, any pre-tokenizer split gives the same ids, so the tokenizer survives transformers rebuilding
    the pre-tokenizer of a qwen2 folder on reload.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, hidden_size=128, num_layers=4, intermediate_size=256, seed=0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate_size,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


# The scale ladder (benchmarks/scale_ladder.py): policies of one family on one task, trained to the same starting
# accuracy band, so that only size differs: (hidden size, layers, MLP size); 0.6M -> 14.3M spans 22.9x.
SIZES = {
    "0.6M": (128, 4, 256),  # the shipped arithmetic-policy: 625,152 parameters
    "3M": (256, 5, 512),  # 3,020,800
    "14M": (512, 6, 1024),  # 14,301,184
}


# SFT learning rate of the smallest (shipped) policy, scaled as 1 / width for the others: at 3e-3 the 3M policy's
# loss fell to 1.02 by step 400 and then rose back to 1.53 (held-out accuracy 0.03 at step 1000; measured once).
BASE_SFT_LEARNING_RATE = 3e-3
BASE_WIDTH = 128


def sft_learning_rate(hidden_size: int) -> float:
    return BASE_SFT_LEARNING_RATE * BASE_WIDTH / hidden_size


class StopAtAccuracy(TrainerCallback):
    def __init__(self, tokenizer, eval_set, target, eval_every, min_steps):
        self.tokenizer, self.eval_set = tokenizer, eval_set
        self.target, self.eval_every, self.min_steps = target, eval_every, min_steps
        self.history = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step < self.min_steps or state.global_step % self.eval_every:
            return
        accuracy = evaluation.greedy_accuracy(model, self.tokenizer, self.eval_set, arithmetic_accuracy, 4, 250)
        self.history.append((state.global_step, accuracy))
        print(f"step {state.global_step}: held-out accuracy {accuracy:.3f}", flush=True)
        if accuracy >= self.target:
            control.should_training_stop = True


# Brief on purpose: ESSA's warm start is a short SFT, and ES needs room above it. On this policy one epoch over 512
# problems at 3e-3 moves held-out accuracy 0.362 -> 0.418; 1e-2 overshoots and drops it to 0.196 (measured once each).
LORA_DEFAULTS = {
    "examples": 512,
    "rank": 4,  # ESSA: rank 2-4 often best
    "alpha": 8,
    "learning_rate": 3e-3,
    "batch_size": 16,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],  # ESSA's attention projections
}


@dataclass(frozen=True)
class WarmStartTask:
    """What an adapter is SFT-trained on: the task's splits, its reward, the answer as an SFT completion, and how
    many tokens a greedy held-out answer may take."""

    dataset: Callable
    reward: Callable
    completion: Callable  # the answer column -> the SFT completion (a string, or an assistant message)
    max_new_tokens: int


LORA_TASKS = {
    "arithmetic": WarmStartTask(arithmetic_dataset, arithmetic_accuracy, lambda answer: answer, 4),
    # Conversational prompt-completion rows: TRL's SFTTrainer applies the base's chat template (SmolLM2's adds its
    # system prompt, as in ES and GRPO training) and takes the loss on the assistant's answer only.
    "chat_arithmetic": WarmStartTask(
        chat_arithmetic_dataset,
        chat_arithmetic_accuracy,
        lambda answer: [{"role": "assistant", "content": answer}],
        16,
    ),
}

# Each task's default base policy and the asset its adapter ships as.
LORA_OUTPUTS = {
    "arithmetic": (ARITHMETIC_POLICY_DIR, ARITHMETIC_LORA_DIR),
    "chat_arithmetic": (f"{BUILTIN}smollm2-135m-instruct", SMOLLM2_CHAT_LORA_DIR),
}


def build_lora_adapter(
    base_dir,
    output_dir,
    examples: int = LORA_DEFAULTS["examples"],
    rank: int = LORA_DEFAULTS["rank"],
    learning_rate: float = LORA_DEFAULTS["learning_rate"],
    seed: int = 0,
    eval_size: int = 500,
    command: str | None = None,
    task: str = "arithmetic",
) -> dict:
    """SFT a LoRA adapter on ``base_dir`` (a folder or a ``builtin:`` name) for one epoch over the first ``examples``
    train problems of ``task``; save it (plain peft: adapter_config.json + adapter_model.safetensors) with a
    build_info.json holding the held-out greedy accuracy of the base and of base + adapter on the first
    ``eval_size`` test problems. The examples come before the validation rows (the last 500 of ``train``)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    for name, value in (("--lora_examples", examples), ("--lora_rank", rank), ("--lora_eval_size", eval_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not learning_rate > 0:
        raise ValueError(f"--lora_learning_rate must be > 0, got {learning_rate}")
    if task not in LORA_TASKS:
        raise ValueError(f"--lora_task must be one of {sorted(LORA_TASKS)}, got {task!r}")
    outside_validation = len(arithmetic_problems("train")) - VALIDATION_SIZE
    if examples > outside_validation:  # settings chosen on validation must not be chosen on the warm start's data
        raise ValueError(
            f"--lora_examples must be <= {outside_validation} (the train problems before the validation split), "
            f"got {examples}"
        )
    warm = LORA_TASKS[task]
    start = time.perf_counter()
    torch.manual_seed(seed)
    base_folder = resolve_model(str(base_dir))
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    held_out = warm.dataset("test", size=eval_size)
    base_accuracy = evaluation.greedy_accuracy(model, tokenizer, held_out, warm.reward, warm.max_new_tokens, 250)
    train = warm.dataset("train", size=examples).map(
        lambda row: {"completion": warm.completion(row["answer"])}, remove_columns=["answer"]
    )
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=LORA_DEFAULTS["alpha"],
        lora_dropout=0.0,
        target_modules=LORA_DEFAULTS["target_modules"],
        task_type="CAUSAL_LM",
    )
    with tempfile.TemporaryDirectory() as scratch:  # nothing but the adapter lands in output_dir
        config = SFTConfig(
            output_dir=scratch,
            num_train_epochs=1,
            per_device_train_batch_size=LORA_DEFAULTS["batch_size"],
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            bf16=False,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            seed=seed,
        )
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
        )
        train_start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_start
    adapted = trainer.model
    adapter_accuracy = evaluation.greedy_accuracy(adapted, tokenizer, held_out, warm.reward, warm.max_new_tokens, 250)
    output = Path(output_dir)
    adapted.save_pretrained(output)
    (output / "README.md").unlink(missing_ok=True)  # peft's empty model card template
    config_path = output / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    # The base is whatever folder the user loads it from (an absolute path of the build machine would mislead), and
    # peft writes target_modules in set order, which changes with the string hash seed: sort for stable bytes.
    saved["base_model_name_or_path"] = None
    saved["target_modules"] = sorted(saved["target_modules"])
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    info = {
        "command": command,
        "task": task,
        # a builtin base by its name (its folder is a cache path of the build machine), and by its weights' hash:
        # the adapter fits those weights only
        "base_policy": str(base_dir) if str(base_dir).startswith(BUILTIN) else Path(base_dir).name,
        "base_weights_sha256": weights_sha256(base_folder),
        # greedy, on the first eval_size held-out problems: the set of the shipped policy's heldout_500_accuracy
        "heldout_accuracy_base": base_accuracy,
        "heldout_accuracy_base_plus_adapter": adapter_accuracy,
        "heldout_problems": eval_size,
        "train_examples": examples,
        "epochs": 1,
        "steps": trainer.state.global_step,
        "batch_size": LORA_DEFAULTS["batch_size"],
        "learning_rate": learning_rate,
        "lora_rank": rank,
        "lora_alpha": LORA_DEFAULTS["alpha"],
        "target_modules": LORA_DEFAULTS["target_modules"],
        "adapter_parameters": sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n),
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # other work on the machine slows the timing
    }
    (output / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None):
    from trl import SFTConfig, SFTTrainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output_dir", default=None, help=f"default: {ARITHMETIC_POLICY_DIR} ({ARITHMETIC_LORA_DIR} with --lora)"
    )
    parser.add_argument("--target_accuracy", type=float, default=0.35)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--min_steps", type=int, default=200)
    parser.add_argument("--max_steps", type=int, default=5000, help="a cap; training stops at --target_accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help=f"SFT learning rate; default {BASE_SFT_LEARNING_RATE:g} x {BASE_WIDTH} / hidden size (the rule every "
        "size is built by)",
    )
    parser.add_argument(
        "--size",
        choices=list(SIZES),
        default="0.6M",
        help="policy size (hidden, layers, MLP) for the scale ladder; 0.6M is the shipped policy",
    )
    lora = parser.add_argument_group("ESSA warm start (--lora)")
    lora.add_argument("--lora", action="store_true", help="train a LoRA adapter on a policy instead")
    lora.add_argument(
        "--lora_task",
        choices=list(LORA_TASKS),
        default="arithmetic",
        help="arithmetic: on the shipped policy; chat_arithmetic: on builtin:smollm2-135m-instruct",
    )
    lora.add_argument("--base_dir", default=None, help="policy the adapter is trained on (default: the task's)")
    lora.add_argument("--lora_examples", type=int, default=LORA_DEFAULTS["examples"])
    lora.add_argument("--lora_rank", type=int, default=LORA_DEFAULTS["rank"])
    lora.add_argument("--lora_learning_rate", type=float, default=LORA_DEFAULTS["learning_rate"])
    lora.add_argument("--lora_eval_size", type=int, default=500, help="held-out test problems measured")
    args = parser.parse_args(argv)
    if args.lora:
        base, output = LORA_OUTPUTS[args.lora_task]
        info = build_lora_adapter(
            args.base_dir or str(base),
            args.output_dir or str(output),
            examples=args.lora_examples,
            rank=args.lora_rank,
            learning_rate=args.lora_learning_rate,
            seed=args.seed,
            eval_size=args.lora_eval_size,
            command=shlex.join(["python", "-m", "benchmarks.build_policy", *(sys.argv[1:] if argv is None else argv)]),
            task=args.lora_task,
        )
        print(json.dumps(info, indent=2))
        return
    args.output_dir = args.output_dir or str(ARITHMETIC_POLICY_DIR)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = build_tokenizer()
    hidden_size, num_layers, intermediate_size = SIZES[args.size]
    learning_rate = args.learning_rate or sft_learning_rate(hidden_size)
    model = build_model(tokenizer, hidden_size, num_layers, intermediate_size, seed=args.seed)
    train = arithmetic_dataset("train").map(lambda row: {"completion": row["answer"]}, remove_columns=["answer"])
    # Stop on a slice of the held-out split disjoint from the 500 problems ES recipes evaluate on.
    stop_set = arithmetic_dataset("test").select(range(500, 1000))
    callback = StopAtAccuracy(tokenizer, stop_set, args.target_accuracy, args.eval_every, args.min_steps)
    config = SFTConfig(
        output_dir=str(Path(args.output_dir) / "_sft_run"),
        max_steps=args.max_steps,
        per_device_train_batch_size=128,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        bf16=False,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_drop_last=True,
    )
    start = time.perf_counter()
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train, processing_class=tokenizer, callbacks=[callback]
    )
    trainer.train()
    seconds = time.perf_counter() - start
    final = evaluation.greedy_accuracy(
        model, tokenizer, arithmetic_dataset("test", size=500), arithmetic_accuracy, 4, 250
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    info = {
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "stop_set_history": callback.history,
        "heldout_500_accuracy": final,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "size": args.size,
        "seed": args.seed,
        "learning_rate": learning_rate,
        "command": shlex.join(["python", "-m", "benchmarks.build_policy", *(sys.argv[1:] if argv is None else argv)]),
    }
    Path(args.output_dir, "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
