"""Peak memory of a few ES steps against a few GRPO steps where the weights dominate (~100M parameters, fp32).

At the quickstart's size (0.6M parameters) the Python/torch baseline (~0.5 GB) hides the algorithms' memory, so
this script uses a randomly initialised Qwen2-style model of ~101M parameters (hidden 768, 16 layers). Each
variant runs in a process of its own (peak RSS = ``ru_maxrss`` of that process) with the same rollouts per step:

  inference      one generate of the step's rows, no training: the floor (weights + KV cache + activations)
  grpo           GRPOTrainer, AdamW (TRL's default), 8 prompts x 4 samples
  es             ESTrainer, full space, defaults (copy restore, update-norm logging; plain SGD, so the update is
                 applied in place from the seeds: inplace_update auto), 4 members x 8 prompts
  es_lean        ESTrainer, full space, perturbation_restore=subtract and log_update_norm=False (in-place update)
  es_lean_pgrad  es_lean with inplace_update=False: the pseudo-gradient in p.grad for the optimizer (how ES ran
                 before the in-place update)

and the script prints each peak, the ratios ES / GRPO, and how far above inference each ES variant sits, in units
of the fp32 weight size. The lean in-place floor is inference plus noise chunks (2^20 numbers, 4 MiB each) and the
update's chunk temporaries; the p.grad path adds one fp32 buffer (1.0), the defaults one weight copy (the bit-exact
restore while a member generates, the update-norm snapshot during the update: never both at once). JSON keys:
``peak_rss_mb`` per variant, ``<variant>_over_grpo``, ``<variant>_above_inference_in_weights``,
``inplace_update`` (what each ES variant resolved to), ``load_average``.

    python benchmarks/memory_es_vs_grpo.py [--json OUT.json]
    python benchmarks/memory_es_vs_grpo.py --model builtin:smollm2-135m-instruct   # a real pretrained model

``--model`` measures a given model (a local folder or a ``builtin:`` name) instead of the random-init one; its chat
template is not used (the prompts are the embedded task's plain text, the same for every variant).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's root: benchmarks.build_policy


HIDDEN, LAYERS, INTERMEDIATE = 768, 16, 2048
PROMPTS, SAMPLES, NEW_TOKENS, STEPS = 8, 4, 8, 3
VARIANTS = ("inference", "grpo", "es", "es_lean", "es_lean_pgrad")
ES_VARIANTS = ("es", "es_lean", "es_lean_pgrad")


def reward_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def load(model_name: str | None):
    """(model, tokenizer): ``model_name`` (a folder or ``builtin:`` name) in fp32, or the random-init ~101M one."""
    import torch

    from benchmarks.build_policy import build_model, build_tokenizer

    if model_name:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trl_es.builtin_models import resolve_model

        folder = resolve_model(model_name)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokenizer
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=HIDDEN, num_layers=LAYERS, intermediate_size=INTERMEDIATE, seed=0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def run_variant(variant: str, model_name: str | None = None) -> dict:
    import torch

    from trl_es.tasks import arithmetic_dataset

    model, tokenizer = load(model_name)
    parameters = sum(p.numel() for p in model.parameters())
    dataset = arithmetic_dataset("train", size=PROMPTS * STEPS * 4)
    common = dict(
        output_dir=f"/tmp/memory_bench_{variant}",
        max_steps=STEPS,
        max_completion_length=NEW_TOKENS,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        bf16=False,
        seed=0,
    )
    start = time.perf_counter()
    inplace = None
    if variant == "inference":
        # Load the same libraries as the trainers, so the floor holds the same Python/torch/TRL baseline.
        import trl_es.trainer  # noqa: F401

        tokenizer.padding_side = "left"
        rows = [p for p in dataset["prompt"][:PROMPTS] for _ in range(SAMPLES)]
        inputs = tokenizer(rows, return_tensors="pt", padding=True)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    elif variant == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common, per_device_train_batch_size=PROMPTS * SAMPLES, num_generations=SAMPLES)
        GRPOTrainer(model, reward_length, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    else:
        from trl_es import ESConfig, ESTrainer

        lean = variant.startswith("es_lean")
        args = ESConfig(
            **common,
            population_size=SAMPLES,
            per_device_train_batch_size=PROMPTS * 2,
            num_generations=2,  # greedy: the two repeats are generated once, so each member completes 8 prompts
            sigma=1e-3,
            perturbation="full",
            perturbation_restore="subtract" if lean else "copy",
            log_update_norm=not lean,
            inplace_update=False if variant.endswith("_pgrad") else None,
        )
        trainer = ESTrainer(model, reward_length, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        inplace = trainer._inplace_update
    return {
        "variant": variant,
        "inplace_update": inplace,
        "parameters": parameters,
        "weights_mb": parameters * 4 / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the measurements and ratios to this file")
    parser.add_argument("--model", help="a local model folder or builtin: name (default: a random-init ~101M model)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model)))
        return
    load_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}")
    results = {}
    for variant in VARIANTS:  # one at a time: two jobs on two cores disturb each other
        command = [sys.executable, __file__, "--variant", variant, *(["--model", args.model] if args.model else [])]
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        if output.returncode != 0:
            sys.exit(f"{variant} failed:\n{output.stderr[-3000:]}")
        results[variant] = json.loads(output.stdout.strip().splitlines()[-1])
        print(
            f"{variant:>14}: peak RSS {results[variant]['peak_rss_mb']:8.0f} MB  ({results[variant]['seconds']:.0f} s)"
        )
    weights = results["es"]["weights_mb"]
    floor = results["inference"]["peak_rss_mb"]
    grpo = results["grpo"]["peak_rss_mb"]
    summary = {
        "model": args.model or f"random-init Qwen2-style (hidden {HIDDEN}, {LAYERS} layers)",
        "parameters": results["es"]["parameters"],
        "weights_mb": round(weights, 1),
        "peak_rss_mb": {v: round(r["peak_rss_mb"], 1) for v, r in results.items()},
        "inplace_update": {v: results[v]["inplace_update"] for v in ES_VARIANTS},
        **{f"{v}_over_grpo": results[v]["peak_rss_mb"] / grpo for v in ES_VARIANTS},
        **{
            f"{v}_above_inference_in_weights": (results[v]["peak_rss_mb"] - floor) / weights
            for v in (*ES_VARIANTS, "grpo")
        },
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }
    print(f"\nmodel: {summary['parameters'] / 1e6:.1f}M parameters, fp32 weights {weights:.0f} MB")
    print(
        f"ES / GRPO peak RSS:  defaults {summary['es_over_grpo']:.2f}, lean {summary['es_lean_over_grpo']:.2f} "
        f"(goal <= 0.45), lean through p.grad {summary['es_lean_pgrad_over_grpo']:.2f}"
    )
    print(
        "above inference, in fp32 weight sizes: "
        + ", ".join(f"{v} {summary[f'{v}_above_inference_in_weights']:.2f}" for v in (*ES_VARIANTS, "grpo"))
        + "  (goal for lean: <= 0.15)"
    )
    print(f"in-place update: {summary['inplace_update']}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in summary['load_average']['end'])}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=2)


if __name__ == "__main__":
    main()
