"""Held-out evaluation shared by the policy builder and the A/B harness: greedy completions scored by a reward."""

import torch
from trl.data_utils import is_conversational, maybe_apply_chat_template


@torch.no_grad()
def greedy_accuracy(model, tokenizer, dataset, reward_func, max_new_tokens: int, batch_size: int) -> float:
    """Mean reward of greedy completions of every held-out prompt (rows where the reward is None are skipped)."""
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            prompts = list(rows["prompt"])
            conversational = is_conversational({"prompt": prompts[0]})
            texts = [maybe_apply_chat_template({"prompt": p}, tokenizer)["prompt"] for p in prompts]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            completion_ids = output[:, encoded["input_ids"].shape[1] :].tolist()
            completion_ids = [
                ids[: ids.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in ids else ids
                for ids in completion_ids
            ]
            decoded = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            completions = [[{"role": "assistant", "content": t}] for t in decoded] if conversational else decoded
            columns = {key: list(rows[key]) for key in rows.column_names if key not in ("prompt", "completion")}
            rewards = reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            valid = [float(r) for r in rewards if r is not None]
            total, count = total + sum(valid), count + len(valid)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return total / count if count else float("nan")
