"""A ten-minute check on one CUDA GPU with no internet: does ES run, how fast, in how much memory, next to GRPO?

Every number in this project so far comes from a 2-core CPU. This script is what to run first when a GPU is lent:
it builds local Qwen2-style models at three sizes (``benchmarks.build_policy.build_model``, byte tokenizer,
random init, saved with ``save_pretrained`` and loaded back from that folder: nothing comes from a hub) and, per
size, in bf16 on the GPU (fp32 with ``--cpu``):

  throughput  greedy generation of one ES step's rows (N = 32 members x P = 8 prompts, 16 new tokens forced), the
              median of 3 timed repeats after a warm-up, with ``benchmarks/population_throughput.py``'s own code:
              ``plain`` (one batched generate, unperturbed: the limit), ``low_rank`` (one ES step in the low-rank
              space: one batched generate of every member's rows, then the update) and ``full`` (one sequential
              full-parameter ES step: per member perturb, generate its rows, restore; then the update); ratios are
              rows per second against ``plain``; and one member's noise for every weight from each noise generator
              (``noise_draw_torch``, ``noise_draw_philox``: on a GPU philox runs as torch ops)
  memory      peak memory of 3 training steps (``memory_steps``) of ``trl.GRPOTrainer`` and of ``ESTrainer``, each
              in a process of its own as in ``benchmarks/memory_es_vs_grpo.py`` (GPU: ``max_memory_allocated``
              during ``train()``; CPU: the process's ``ru_maxrss``), with the quickstart recipe's settings
  train       ``--steps`` (20) quickstart-style steps of each trainer on the smallest size (every size with
              ``--train_all_sizes``): seconds per step, rollouts per second, greedy held-out accuracy before and
              after on 200 test problems. Random weights answer (almost) nothing right, so the accuracies show the
              loop runs end to end, not that it learns (the training reward has a small extra term so that the
              update paths run: see ``EXTRA_REWARD_WEIGHT``).

The trainers get recipes/quickstart.yaml's ES and GRPO arms as ``trl-es compare`` builds them (ES: full space,
population 32, sigma 0.01, SGD 4e-4, greedy, 128 prompts a step; GRPO: 8 samples at temperature 1, AdamW 6e-4, 256
completions a step), with the weights loaded in the run's dtype. ``--cpu --tiny`` (three tiny sizes, a few steps, a
population of 4) runs the same code end to end on a CPU in about a minute: ``tests/test_gpu_check.py`` runs it, so
the script is known to work before GPU time is spent on it. Writes one JSON (``--output``) and prints a table; the
keys are listed in benchmarks/README.md.

    bash benchmarks/gpu_check.sh --output outputs/gpu_check.json
    python benchmarks/gpu_check.py --cpu --tiny --output outputs/gpu_check_cpu.json
"""

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
import trl


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's trl_es, as the other benchmarks that run from the repo root

from population_throughput import PopulationStep, interleaved_times  # noqa: E402

from trl_es.core import NOISE_GENERATORS, MemberNoise  # noqa: E402


# (hidden, layers, MLP). 23.7M and 104.1M are the larger models of population_throughput.py and memory_es_vs_grpo.py,
# whose CPU numbers are in benchmarks/README.md; 491.1M is about Qwen2.5-0.5B (the byte vocabulary has 259 tokens, so
# almost every parameter is in the blocks). build_model has 4 heads: hidden / 4 must be even for the rotary embedding.
SIZES = ((512, 8, 1408), (768, 16, 2048), (1024, 24, 5632))
TINY_SIZES = ((32, 1, 64), (64, 2, 128), (128, 2, 256))
SETTINGS = {
    "members": 32, "prompts": 8, "new_tokens": 16, "rank": 1, "repeats": 3, "memory_steps": 3, "steps": 20,
    "eval_problems": 200,
}  # fmt: skip
TINY_SETTINGS = {
    "members": 4, "prompts": 2, "new_tokens": 4, "rank": 1, "repeats": 3, "memory_steps": 2, "steps": 2,
    "eval_problems": 20,
}  # fmt: skip
# --tiny shrinks the quickstart arms to a population of 4 on 4 prompts and GRPO to 2 prompts x 4 samples a step; a
# larger sigma, so that so few members of such small models still differ and ES updates (steps_with_update).
TINY_ARMS = {
    "es": {"population_size": 4, "per_device_train_batch_size": 8, "sigma": 0.05},
    "grpo": {"num_generations": 4, "per_device_train_batch_size": 8},
}
TIME_BUDGET_S = 600
# A random-init model answers no sum right, so accuracy alone gives every member the same fitness: ES would skip its
# update and GRPO's advantages would be zero, and neither update path would be timed or checked. A small term that
# any change of a completion moves (such a model mostly repeats the prompt's last character: "====") keeps both busy;
# held-out accuracy is arithmetic_accuracy alone.
EXTRA_REWARD_WEIGHT = 0.1


def distinct_characters(completions, **kwargs) -> list[float]:
    return [len(set(text)) / max(1, len(text)) for text in completions]


def quickstart_arms(tiny: bool) -> dict:
    """The quickstart recipe's ES and GRPO settings, each with the shared training keys (completion length, seed)."""
    from trl_es.compare.plan import SHARED_TRAINING_KEYS, make_plan
    from trl_es.recipes import load_recipe

    plan = make_plan(load_recipe(str(ROOT / "recipes" / "quickstart.yaml")))
    shared = {key: value for key, value in plan.shared.items() if key in SHARED_TRAINING_KEYS}
    arms = {}
    for kind in ("es", "grpo"):
        config = {**shared, **plan.arms[kind], **(TINY_ARMS[kind] if tiny else {})}
        config.pop("max_steps")  # the budget of a comparison; here settings["steps"] / ["memory_steps"]
        arms[kind] = config
    return arms


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_trainer(spec: dict) -> dict:
    """Child process: ``spec["steps"]`` steps of one trainer on the model folder (own process: its own peak)."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_es import ESConfig, ESTrainer
    from trl_es.compare.arm import RolloutCounter
    from trl_es.evaluation import greedy_accuracy
    from trl_es.tasks import arithmetic_accuracy, arithmetic_dataset

    device = spec["device"]
    if device == "cpu":
        torch.set_num_threads(1)
    step_ends = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if device == "cuda":  # the peak of training, not of loading or the evaluation before it
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    config_cls, trainer_cls = (ESConfig, ESTrainer) if spec["kind"] == "es" else (GRPOConfig, GRPOTrainer)
    config = {
        **spec["config"],
        "output_dir": spec["output_dir"],
        "max_steps": spec["steps"],
        "bf16": device == "cuda",  # the recipe's bf16: false is for its CPU
        "use_cpu": device == "cpu",
        "model_init_kwargs": {"dtype": spec["dtype"]},
        "reward_weights": [1.0, EXTRA_REWARD_WEIGHT],
        "logging_steps": 1,  # the reward of the first and of the last step
    }
    args = config_cls(**config)
    counting_cls = type(f"RolloutCounting{trainer_cls.__name__}", (RolloutCounter, trainer_cls), {})
    # A folder path: the trainer loads model and tokenizer from it, the no-hub path a user without internet takes.
    trainer = counting_cls(
        model=spec["model_dir"],
        reward_funcs=[arithmetic_accuracy, distinct_characters],
        args=args,
        train_dataset=arithmetic_dataset("train"),
        callbacks=[StepClock()],
    )
    held_out = arithmetic_dataset("test", size=spec["eval_problems"]) if spec["eval_problems"] else None

    def evaluate():
        model = trainer.accelerator.unwrap_model(trainer.model)
        tokens = args.max_completion_length
        return greedy_accuracy(model, trainer.processing_class, held_out, arithmetic_accuracy, tokens, 100)

    before = evaluate() if held_out else None
    trainer.train()
    peak = peak_memory_mb(device)
    steps = trainer.state.global_step
    durations = [end - start for start, end in zip(step_ends, step_ends[1:])]
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]  # one per step (logging_steps=1)
    train_seconds = step_ends[-1] - step_ends[0]
    return {
        "steps": steps,
        "train_seconds": train_seconds,
        # the median step leaves out the first step's one-off costs (kernels, allocator), which a short run shows
        "seconds_per_step": statistics.median(durations),
        "first_step_seconds": durations[0],
        "rollouts": trainer.rollouts,
        "rollouts_per_second": trainer.rollouts / train_seconds,
        "peak_memory_mb": peak,
        # the mean training reward (accuracy + EXTRA_REWARD_WEIGHT x distinct characters), first and last step
        "reward_first_step": logged[0]["reward"],
        "reward_last_step": logged[-1]["reward"],
        # ES makes no update in a step whose members all scored the same: whether the update path ran at all
        "steps_with_update": sum(entry.get("grad_norm", 0) > 0 for entry in logged),
        "accuracy_before": before,
        "accuracy_after": evaluate() if held_out else None,
    }


def child(spec: dict, log: Path) -> dict:
    """Run ``spec`` in a fresh process (a peak memory of its own); its output goes to ``log``, its result to
    ``spec["result"]``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU: Trainer would wrap the model in DataParallel on several
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    result = Path(spec["result"])
    result.unlink(missing_ok=True)
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, check=False)
    if done.returncode != 0 or not result.exists():
        tail = "\n".join(log.read_text().splitlines()[-40:])
        sys.exit(f"{spec['kind']} on {spec['model_dir']} failed (exit {done.returncode}, log {log}):\n{tail}")
    return json.loads(result.read_text())


def build(sizes, folder: Path, device: str, dtype: torch.dtype) -> list[dict]:
    from benchmarks.build_policy import build_model, build_tokenizer

    entries = []
    for hidden, layers, intermediate in sizes:
        start = time.perf_counter()
        tokenizer = build_tokenizer()
        with torch.device(device):  # random init of 0.5B numbers takes seconds on a CPU, not on a GPU
            model = build_model(tokenizer, hidden, layers, intermediate, seed=0)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        parameters = sum(p.numel() for p in model.parameters())
        name = f"{parameters / 1e6:.1f}M" if parameters >= 1e5 else f"{parameters / 1e3:.1f}K"
        path = folder / f"qwen2-{name}"
        model.to(dtype).save_pretrained(path)  # in the run's dtype: half the bytes to write and read on a GPU
        tokenizer.save_pretrained(path)
        del model
        gc.collect()
        entries.append(
            {
                "name": name,
                "hidden_size": hidden,
                "num_layers": layers,
                "intermediate_size": intermediate,
                "parameters": parameters,
                "model_dir": str(path),
                "build_seconds": time.perf_counter() - start,
            }
        )
    return entries


def throughput(model_dir: str, settings: dict, device: str, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    members, prompts = settings["members"], settings["prompts"]
    step = PopulationStep(model, tokenizer, members, prompts, settings["new_tokens"], settings["rank"])
    variants = {"plain": step.plain, "low_rank": step.low_rank_step, "full": step.full_step}
    # One member's noise for every weight, from each generator: philox has no compiled kernel off the CPU, so on a
    # GPU this says what its torch ops cost next to CUDA's own generator (the trainer warns that they are slower).
    for generator in NOISE_GENERATORS:
        noise = MemberNoise(0, members, generator=generator)
        variants[f"noise_draw_{generator}"] = lambda noise=noise, model=model: draw_member_noise(model, noise)
    # Every variant warmed up: on a GPU the first call of each pays for its own kernels and allocations.
    sync = torch.cuda.synchronize if device == "cuda" else None
    times = interleaved_times(variants, settings["repeats"], warm_up=tuple(variants), synchronize=sync)
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = members * prompts
    del step, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "seconds": median,
        "seconds_all": times,
        "rows_per_second": {name: rows / median[name] for name in ("plain", "low_rank", "full")},
        "low_rank_vs_plain": median["plain"] / median["low_rank"],
        "full_vs_plain": median["plain"] / median["full"],
        "philox_noise_vs_torch": median["noise_draw_torch"] / median["noise_draw_philox"],
    }


def draw_member_noise(model, noise) -> None:
    """Member 0's noise for every parameter, chunk by chunk, on the parameter's device (dropped)."""
    for name, param in model.named_parameters():
        for span in noise.chunk_spans(param.numel()):
            noise.span_noise(0, 0, name, param.numel(), span, param.device)


def trainer_runs(entry: dict, label: str, steps: int, eval_problems: int, runs: dict) -> dict:
    """ES, then GRPO (one at a time: two at once would share the device and time each other), on ``entry``'s model."""
    work = Path(runs["work"])
    results = {}
    for kind in ("es", "grpo"):
        name = f"{entry['name']}_{kind}_{label}"
        spec = {
            "kind": kind,
            "model_dir": entry["model_dir"],
            "device": runs["device"],
            "dtype": runs["dtype"],
            "steps": steps,
            "eval_problems": eval_problems,
            "config": runs["arms"][kind],
            "output_dir": str(work / "runs" / name),
            "result": str(work / "logs" / f"{name}.json"),
        }
        print(f"{entry['name']}: {kind} {label}, {steps} steps ...", flush=True)
        results[kind] = child(spec, work / "logs" / f"{name}.log")
    return results


def check_size(entry: dict, settings: dict, runs: dict, train: bool) -> None:
    """Throughput, memory and (if ``train``) the train comparison of one size, into ``entry``."""
    device, dtype = runs["device"], getattr(torch, runs["dtype"])
    phase = time.perf_counter()
    print(f"{entry['name']}: throughput ...", flush=True)
    entry["throughput"] = throughput(entry["model_dir"], settings, device, dtype)
    entry["throughput_seconds"] = time.perf_counter() - phase
    phase = time.perf_counter()
    memory = trainer_runs(entry, "memory", settings["memory_steps"], 0, runs)
    entry["memory"] = {
        "measure": "torch.cuda.max_memory_allocated during train()" if device == "cuda" else "ru_maxrss",
        "es_mb": memory["es"]["peak_memory_mb"],
        "grpo_mb": memory["grpo"]["peak_memory_mb"],
        "es_over_grpo": memory["es"]["peak_memory_mb"] / memory["grpo"]["peak_memory_mb"],
        "weights_mb": entry["parameters"] * dtype.itemsize / 2**20,
        "runs": memory,
    }
    entry["memory_seconds"] = time.perf_counter() - phase
    entry["train"] = None
    if train:
        phase = time.perf_counter()
        entry["train"] = trainer_runs(entry, "train", settings["steps"], settings["eval_problems"], runs)
        entry["train_seconds"] = time.perf_counter() - phase


def report(result: dict) -> None:
    print(f"\n{result['device']} ({result['dtype']}), weights {result['weights']}, {result['total_seconds']:.0f} s")
    print(
        f"{'size':>8} {'params':>12} {'plain s':>8} {'low_rank s':>10} {'x plain':>7} {'full s':>8} {'x plain':>7} "
        f"{'ES MB':>8} {'GRPO MB':>8} {'ES/GRPO':>7}"
    )
    for size in result["sizes"]:
        speed, memory = size["throughput"], size["memory"]
        print(
            f"{size['name']:>8} {size['parameters']:>12,} {speed['seconds']['plain']:>8.3f} "
            f"{speed['seconds']['low_rank']:>10.3f} {speed['low_rank_vs_plain']:>7.2f} "
            f"{speed['seconds']['full']:>8.3f} {speed['full_vs_plain']:>7.2f} "
            f"{memory['es_mb']:>8.0f} {memory['grpo_mb']:>8.0f} {memory['es_over_grpo']:>7.2f}"
        )
    for size in result["sizes"]:
        seconds = size["throughput"]["seconds"]
        print(
            f"noise of one member, {size['name']}: torch {seconds['noise_draw_torch']:.4f} s, philox "
            f"{seconds['noise_draw_philox']:.4f} s ({size['throughput']['philox_noise_vs_torch']:.2f}x the speed)"
        )
    for size in result["sizes"]:
        for kind, run in (size["train"] or {}).items():
            print(
                f"train {size['name']} {kind:>4}: {run['steps']} steps, {run['seconds_per_step']:.3f} s/step, "
                f"{run['rollouts_per_second']:,.0f} rollouts/s, held-out accuracy {run['accuracy_before']:.3f} -> "
                f"{run['accuracy_after']:.3f}"
            )
    for warning in result["warnings"]:
        print(f"WARNING: {warning}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/gpu_check.json", help="the JSON; models go beside it")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (fp32, one thread) instead of CUDA")
    parser.add_argument("--tiny", action="store_true", help="three tiny sizes and a few steps: a ~1 minute smoke run")
    parser.add_argument("--steps", type=int, default=None, help="train comparison steps (default 20; 2 with --tiny)")
    parser.add_argument(
        "--sizes", nargs="+", default=None, metavar="HxLxI", help="hidden x layers x MLP per size, e.g. 512x8x1408"
    )
    parser.add_argument("--train_all_sizes", action="store_true", help="the train comparison on every size")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="weights' dtype (default bfloat16 on CUDA, float32 with --cpu; --cpu --dtype bfloat16 checks bf16 code)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # child process mode: one trainer run, JSON on stdout
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        Path(spec["result"]).write_text(json.dumps(run_trainer(spec), indent=2) + "\n")
        return
    if not args.cpu and not torch.cuda.is_available():
        sys.exit(
            "gpu_check needs a CUDA GPU, and torch.cuda.is_available() is False here. Pass --cpu to run it on the "
            "CPU (with --tiny for the ~1 minute smoke run)."
        )
    start = time.perf_counter()
    device = "cpu" if args.cpu else "cuda"
    dtype = getattr(torch, args.dtype or ("float32" if args.cpu else "bfloat16"))
    if args.cpu:
        torch.set_num_threads(1)  # a smoke run on a shared machine: the CPU numbers are not the point
    settings = dict(TINY_SETTINGS if args.tiny else SETTINGS)
    settings["steps"] = args.steps or settings["steps"]
    sizes = TINY_SIZES if args.tiny else SIZES
    if args.sizes:
        sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes]
    sizes = sorted(sizes, key=lambda s: s[1] * s[0] * (s[0] + s[2]))  # ~ block parameters: the first is the smallest
    output = Path(args.output)
    work = output.parent / f"{output.stem}_work"  # the model folders and the trainers' logs
    (work / "logs").mkdir(parents=True, exist_ok=True)
    arms = quickstart_arms(args.tiny)
    load_start = os.getloadavg()
    print(f"building {len(sizes)} models in {work} ...", flush=True)
    entries = build(sizes, work, device, dtype)
    runs = {"device": device, "dtype": str(dtype).removeprefix("torch."), "arms": arms, "work": str(work)}
    for index, entry in enumerate(entries):
        check_size(entry, settings, runs, train=index == 0 or args.train_all_sizes)
    total = time.perf_counter() - start
    warnings = []
    if device == "cuda" and total > TIME_BUDGET_S:
        warnings.append(f"the check took {total:.0f} s, over its budget of {TIME_BUDGET_S} s")
    result = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "device_type": device,
        "gpu_memory_mb": torch.cuda.get_device_properties(0).total_memory / 2**20 if device == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "tiny": args.tiny,
        "weights": "random init",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "settings": settings,
        "arms": arms,
        "sizes": entries,
        "total_seconds": total,
        "time_budget_s": {"limit": TIME_BUDGET_S, "applies": device == "cuda", "exceeded": total > TIME_BUDGET_S},
        "warnings": warnings,
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }
    output.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
