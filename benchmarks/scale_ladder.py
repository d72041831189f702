"""Does the ES-GRPO gap shrink with model size? `trl-es compare` on a ladder of policies that differ only in size.

    python benchmarks/scale_ladder.py --output_dir outputs/scale_ladder [--sizes 0.6M 3M 14M] [--seeds 3] [--grid]

For each rung (``trl_es.tasks.build_policy.SIZES``: one Qwen2-style family, one task, the same tokenizer) the
policy is built by the reproducible builder with a fixed seed and stopped in the same starting accuracy band (the
0.6M rung is the shipped policy), then `trl-es compare --config recipes/quickstart.yaml` runs on it. Budget rules,
the same for every rung:

* rollouts: the recipe's budget (307,200 generated completions), unchanged, so "equal rollouts" means the same
  amount of data at every size;
* wall-clock: the recipe's ``budget_seconds`` times the rung's measured cost of one batched generation relative to
  the 0.6M rung (timed here, in this run), so a bigger model gets proportionally more seconds for the same work.

Each arm keeps the recipe's learning rate unless ``--grid`` is given (then each arm's best of x0.5/x1/x2 is used,
selected the same way for both arms). Writes ``OUTPUT/scale_ladder.json`` (a list of rungs with ``parameters``,
``es_minus_grpo_equal_wall_clock``, ``es_minus_grpo_equal_rollouts``, ``seeds`` and the per-arm numbers),
``scale_ladder.png`` (the gap against parameters, log x) and every rung's compare report. Heavy: on a 2-core CPU
the 0.6M rung alone takes ~20 minutes at 3 seeds, and the cost grows with the model; run it on an idle machine.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml


ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def build_rung(size: str, cache: Path) -> Path:
    from trl_es.tasks import ARITHMETIC_POLICY_DIR

    if size == "0.6M":
        return ARITHMETIC_POLICY_DIR
    folder = cache / f"arithmetic-policy-{size}"
    if not (folder / "build_info.json").exists():
        command = [sys.executable, "-m", "trl_es.tasks.build_policy", "--size", size, "--output_dir", str(folder)]
        print("building:", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return folder


@torch.no_grad()
def generation_seconds(model_dir: Path, rows: int = 128, repeats: int = 3) -> float:
    """Median seconds of one greedy batched generation of ``rows`` prompts (the unit of an ES member's work)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_es.tasks import arithmetic_dataset

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    prompts = list(arithmetic_dataset("train", size=rows)["prompt"])
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(**encoded, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gap(summary: dict, key: str) -> float | None:
    entry = summary.get(key) or {}
    if "es" not in entry or "grpo" not in entry:
        return None
    return entry["es"]["mean"] - entry["grpo"]["mean"]


def plot(rungs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("es_minus_grpo_equal_wall_clock", "equal wall-clock"),
        ("es_minus_grpo_equal_rollouts", "equal rollouts"),
    ):
        points = [(r["parameters"], r[key]) for r in rungs if r[key] is not None]
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=label)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("policy parameters")
    axis.set_ylabel("ES - GRPO held-out accuracy")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    from trl_es.tasks.build_policy import SIZES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", action="store_true")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(RECIPE.read_text())
    base_seconds = recipe["compare"]["budget_seconds"]

    folders = {size: build_rung(size, output / "policies") for size in args.sizes}
    reference = generation_seconds(build_rung("0.6M", output / "policies"))
    rungs = []
    for size, folder in folders.items():
        cost = generation_seconds(folder) / reference
        budget_seconds = round(base_seconds * max(cost, 1.0))
        command = [
            sys.executable, "-m", "trl_es.cli", "compare", "--config", str(RECIPE),
            "--output_dir", str(output / size), "--seeds", str(args.seeds),
            "--model_name_or_path", str(folder), "--compare.budget_seconds", str(budget_seconds),
        ] + (["--grid"] if args.grid else [])  # fmt: skip
        print(f"rung {size}: generation cost x{cost:.2f}, budget {budget_seconds} s", flush=True)
        subprocess.run(command, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        report = json.loads((output / size / "compare.json").read_text())
        info = json.loads((Path(folder) / "build_info.json").read_text())
        summary = report["summary"]
        rungs.append(
            {
                "size": size,
                "parameters": info["num_parameters"],
                "start_accuracy": info["heldout_500_accuracy"],
                "generation_cost_vs_smallest": round(cost, 3),
                "budget_seconds": budget_seconds,
                "budget_rollouts": report["budget"]["rollouts"],
                "seeds": args.seeds,
                "es_minus_grpo_equal_wall_clock": gap(summary, "equal_wall_clock_s"),
                "es_minus_grpo_equal_rollouts": gap(summary, "equal_rollouts"),
                "es": summary.get("es"),
                "grpo": summary.get("grpo"),
                "load_average_at_end": os.getloadavg(),
            }
        )
        (output / "scale_ladder.json").write_text(json.dumps(rungs, indent=2))
    plot(rungs, output / "scale_ladder.png")
    print(json.dumps(rungs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
