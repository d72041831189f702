"""Build the embedded default policy: a byte-level tokenizer and a ~0.6M-parameter Qwen2-style model, trained
with TRL's ``SFTTrainer`` on the arithmetic train split until it is *partly* right.

Training stops as soon as greedy held-out accuracy reaches ``--target_accuracy`` (measured every
``--eval_every`` steps), because the partial-accuracy window of such a small model is narrow: a fixed step count
lands anywhere between 5% and 95% on different machines. The result ships in ``trl_es/assets/arithmetic-policy``
so every machine starts ES from the same weights; rerun this to rebuild it (~1-3 minutes on 2 CPU cores)::

    python -m trl_es.tasks.build_policy --output_dir trl_es/assets/arithmetic-policy
"""

import argparse
import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

from .. import evaluation
from .arithmetic import ARITHMETIC_POLICY_DIR, arithmetic_accuracy, arithmetic_dataset


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


def main(argv=None):
    from trl import SFTConfig, SFTTrainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(ARITHMETIC_POLICY_DIR))
    parser.add_argument("--target_accuracy", type=float, default=0.35)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--min_steps", type=int, default=200)
    parser.add_argument("--max_steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=args.seed)
    train = arithmetic_dataset("train").map(lambda row: {"completion": row["answer"]}, remove_columns=["answer"])
    # Stop on a slice of the held-out split disjoint from the 500 problems ES recipes evaluate on.
    stop_set = arithmetic_dataset("test").select(range(500, 1000))
    callback = StopAtAccuracy(tokenizer, stop_set, args.target_accuracy, args.eval_every, args.min_steps)
    config = SFTConfig(
        output_dir=str(Path(args.output_dir) / "_sft_run"),
        max_steps=args.max_steps,
        per_device_train_batch_size=128,
        learning_rate=3e-3,
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
        "seed": args.seed,
    }
    Path(args.output_dir, "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
