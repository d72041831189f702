"""``trl-es compare``: ES against GRPO on the same recipe, base model, prompts, rewards and budget.

    trl-es compare --config recipes/quickstart.yaml --output_dir outputs/compare [--seeds 3] [--grid]
                   [--key value ...] [--es.key value ...] [--grpo.key value ...]

Every (arm, learning rate, seed) trains in a process of its own, one after another (two jobs sharing two cores
would slow each other and spoil the wall-clock axis). A run that fails is reported with the tail of its log; the
others still run, and the report is rewritten after each run, so an interrupted comparison keeps what finished.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..recipes import load_recipe, parse_overrides
from .plan import make_plan
from .report import build_arm, write_report


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="trl-es compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML (a train recipe, optionally with grpo/compare)")
    parser.add_argument("--output_dir", required=True, help="where compare.json / .md / .png and logs go")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per arm: seed, seed + 1, ... (default 1)")
    parser.add_argument(
        "--grid", action="store_true", help="also try each arm's learning-rate grid; report each arm's best"
    )
    return parser.parse_known_args(argv)


def _run_one(spec: dict, run_dir: Path) -> dict:
    """Train one arm in a child process; its progress lines go to our stdout, everything else to a log file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = run_dir / "spec.json", run_dir / "result.json", run_dir / "log.txt"
    spec_path.write_text(json.dumps(spec, indent=2))
    result_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.run(
            [sys.executable, "-m", "trl_es.compare.arm", str(spec_path), str(result_path)],
            stdout=None,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if process.returncode != 0 or not result_path.exists():
        tail = log_path.read_text().strip().splitlines()[-15:]
        message = next((line for line in reversed(tail) if "Error" in line), tail[-1] if tail else "no output")
        raise RuntimeError(f"exit code {process.returncode}: {message} (full log: {log_path})")
    return json.loads(result_path.read_text())


def compare(config_path: str, output_dir: str, seeds: int = 1, grid: bool = False, overrides=None) -> dict:
    """Run every (seed, arm, learning rate) in its own process and write the report; returns the report dict."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    plan = make_plan(load_recipe(config_path), parse_overrides(overrides or []))
    base_seed = int(plan.shared.get("seed", 42))
    seed_list = [base_seed + offset for offset in range(seeds)]
    learning_rates = {
        name: plan.grids[name] if grid else [config.get("learning_rate")] for name, config in plan.arms.items()
    }
    grid_runs = {name: {} for name in plan.arms}
    errors = {name: [] for name in plan.arms}
    report = {
        "arms": {},
        "budget": {
            "rollouts": plan.budget_rollouts,
            "seconds": plan.budget_seconds,
            "eval_every_rollouts": plan.eval_every_rollouts(),
            "seeds": seed_list,
            "note": "each arm stops at whichever budget it reaches first; evaluation time is not counted",
        },
        "config": {
            "recipe": str(config_path),
            "plan": plan.to_json(),
            "eval_examples": plan.shared.get("dataset_test_size"),
        },
    }
    jobs = [(seed, name, lr) for seed in seed_list for name in plan.arms for lr in learning_rates[name]]
    start = time.perf_counter()
    for index, (seed, name, lr) in enumerate(jobs, 1):
        label = f"{name}" + (f"_lr{lr:g}" if lr is not None else "") + f"_seed{seed}"
        print(f"== [{index}/{len(jobs)}] {label} ({time.perf_counter() - start:.0f}s elapsed)", flush=True)
        config = {**plan.shared, **plan.arms[name], "seed": seed, "output_dir": str(output / "runs" / label)}
        if lr is not None:
            config["learning_rate"] = lr
        spec = {
            "arm": name,
            "seed": seed,
            "config": config,
            "budget_rollouts": plan.budget_rollouts,
            "budget_seconds": plan.budget_seconds,
            "eval_every_rollouts": plan.eval_every_rollouts(),
        }
        try:
            result = _run_one(spec, output / "runs" / label)
            grid_runs[name].setdefault(result["learning_rate"], []).append(result)
        except (RuntimeError, OSError) as error:
            print(f"!! {label} failed: {error}", flush=True)
            errors[name].append({"seed": seed, "learning_rate": lr, "error": str(error)})
        report["arms"] = {n: build_arm(plan.arms[n], grid_runs[n], errors[n]) for n in plan.arms}
        write_report(output, report)
    print((output / "compare.md").read_text(), flush=True)
    print(f"wrote {output / 'compare.json'}, compare.md, compare.png", flush=True)
    return report


def main(argv: list[str]) -> int:
    args, overrides = _parse(argv)
    report = compare(args.config, args.output_dir, args.seeds, args.grid, overrides)
    failed = [name for name, arm in report["arms"].items() if not arm["runs"]]
    return 1 if failed else 0
