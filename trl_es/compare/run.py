"""``trl-es compare``: ES, its variants and GRPO on the same recipe, base model, prompts, rewards and budget.

    trl-es compare --config recipes/quickstart.yaml --output_dir outputs/compare [--seeds 3] [--grid]
                   [--arms es,many,grpo] [--key value ...] [--es.key value ...] [--grpo.key value ...]
                   [--variants.NAME.key value ...]

Every (seed, arm, grid point) trains in a process of its own, one after another (two jobs sharing two cores would
slow each other and spoil the wall-clock axis). A run that fails is reported with the tail of its log; the others
still run, and the report is rewritten after each run, so an interrupted comparison keeps what finished. The machine's
load is recorded at the start and end, and other processes' CPU use during each run (``compare.machine``).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..recipes import load_recipe, parse_overrides
from .machine import CpuWindow, load_average, machine_record
from .plan import check_arms, make_plan
from .report import SELECTION_METRIC, build_arm, point_label, write_report


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    # No abbreviations: the unknown options are recipe overrides, and `--seed 43` must set the recipe's seed, not be
    # read as `--seeds 43`.
    parser = argparse.ArgumentParser(prog="trl-es compare", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="recipe YAML (a train recipe, optionally with grpo/compare)")
    parser.add_argument("--output_dir", required=True, help="where compare.json / .md / .png and logs go")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per arm: seed, seed + 1, ... (default 1)")
    parser.add_argument(
        "--grid",
        action="store_true",
        help="also try each arm's grid (compare.grid, default its learning rate x 0.5/1/2; cma_sigma0 for CMA-ES); "
        "each arm's point is chosen on the validation split (needs compare.validation_size), reported on test",
    )
    parser.add_argument(
        "--arms", default=None, help="comma-separated arms to run (es, grpo, variant names; default: all)"
    )
    return parser.parse_known_args(argv)


def _run_one(spec: dict, run_dir: Path) -> dict:
    """Train one arm in a child process; its progress lines go to our stdout, everything else to a log file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = run_dir / "spec.json", run_dir / "result.json", run_dir / "log.txt"
    spec_path.write_text(json.dumps(spec, indent=2))
    result_path.unlink(missing_ok=True)
    window = CpuWindow().start()
    with open(log_path, "w") as log:
        process = subprocess.run(
            [sys.executable, "-m", "trl_es.compare.arm", str(spec_path), str(result_path)],
            stdout=None,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    machine = window.stop()
    if process.returncode != 0 or not result_path.exists():
        tail = log_path.read_text().strip().splitlines()[-15:]
        message = next((line for line in reversed(tail) if "Error" in line), tail[-1] if tail else "no output")
        raise RuntimeError(f"exit code {process.returncode}: {message} (full log: {log_path})")
    return {**json.loads(result_path.read_text()), "machine": machine}


def _label(name: str, point: dict, seed: int) -> str:
    parts = [name] + [
        f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}" for key, value in point.items()
    ]
    return "_".join(parts).replace("/", "-").replace(" ", "") + f"_seed{seed}"


def compare(config_path: str, output_dir: str, seeds: int = 1, grid: bool = False, overrides=None, arms=None) -> dict:
    """Run every (seed, arm, grid point) in its own process and write the report; returns the report dict."""
    start_load = load_average()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    plan = make_plan(load_recipe(config_path), parse_overrides(overrides or []), arms)
    if grid and plan.validation_size is None:
        raise ValueError(
            "--grid chooses each arm's settings on a validation split carved from the training data; set "
            "compare.validation_size (e.g. 500) in the recipe or --compare.validation_size 500"
        )
    check_arms(plan, grid, str(output / "runs"))  # every arm's settings, before the first one trains for minutes
    base_seed = int(plan.shared.get("seed", 42))
    seed_list = [base_seed + offset for offset in range(seeds)]
    points = {name: plan.grids[name] if grid else [{}] for name in plan.arms}
    keyed = {name: {point_label(point): point for point in points[name]} for name in plan.arms}
    grid_runs = {name: {key: [] for key in keyed[name]} for name in plan.arms}
    errors = {name: [] for name in plan.arms}
    finished = []
    report = {
        "arms": {},
        "budget": {
            "rollouts": plan.budget_rollouts,
            "seconds": plan.budget_seconds,
            "eval_every_rollouts": plan.eval_every_rollouts(),
            "seeds": seed_list,
            "max_steps": {name: config["max_steps"] for name, config in plan.arms.items()},
            "note": "each arm stops at whichever budget it reaches first; evaluation time is not counted",
        },
        "splits": {
            "reported_on": "test",
            "test_examples": plan.shared.get("dataset_test_size"),
            "selected_on": "validation" if grid else None,
            "validation_examples": plan.validation_size,
            "selection": f"best mean {SELECTION_METRIC} over seeds" if grid else "no grid: each arm as configured",
        },
        "config": {
            "recipe": str(config_path),
            "plan": plan.to_json(),
            "eval_examples": plan.shared.get("dataset_test_size"),
        },
    }
    jobs = [(seed, name, key) for seed in seed_list for name in plan.arms for key in keyed[name]]
    start = time.perf_counter()
    for index, (seed, name, key) in enumerate(jobs, 1):
        point = keyed[name][key]
        label = _label(name, point, seed)
        print(f"== [{index}/{len(jobs)}] {label} ({time.perf_counter() - start:.0f}s elapsed)", flush=True)
        config = {**plan.shared, **plan.arms[name], **point, "seed": seed, "output_dir": str(output / "runs" / label)}
        spec = {
            "arm": plan.kinds[name],
            "name": name,
            "seed": seed,
            "grid_point": point,
            "config": config,
            "budget_rollouts": plan.budget_rollouts,
            "budget_seconds": plan.budget_seconds,
            "eval_every_rollouts": plan.eval_every_rollouts(),
        }
        try:
            result = _run_one(spec, output / "runs" / label)
            grid_runs[name][key].append(result)
            finished.append({"label": label, "machine": result["machine"]})
            if result["machine"].get("busy"):
                print(
                    f"!! {label}: other processes used {result['machine']['others_cpu_cores']} cores on average "
                    "while it trained; its wall-clock numbers are not comparable",
                    flush=True,
                )
        except (RuntimeError, OSError) as error:
            print(f"!! {label} failed: {error}", flush=True)
            errors[name].append({"seed": seed, "grid_point": point, "error": str(error)})
        report["arms"] = {
            n: build_arm(plan.arms[n], grid_runs[n], errors[n], keyed[n], plan.kinds[n], plan.variants.get(n))
            for n in plan.arms
        }
        report["machine"] = machine_record(start_load, finished)
        write_report(output, report)
    print((output / "compare.md").read_text(), flush=True)
    print(f"wrote {output / 'compare.json'}, compare.md, compare.png", flush=True)
    return report


def main(argv: list[str]) -> int:
    args, overrides = _parse(argv)
    arms = [name.strip() for name in args.arms.split(",") if name.strip()] if args.arms else None
    report = compare(args.config, args.output_dir, args.seeds, args.grid, overrides, arms)
    failed = [name for name, arm in report["arms"].items() if not arm["runs"]]
    return 1 if failed else 0
