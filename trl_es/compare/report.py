"""compare.json, compare.md and compare.png from the arms' run records.

Accuracy "at" a budget point is the last held-out evaluation at or before it (what a run stopped there would have
delivered); nothing is interpolated between evaluations. Spread over seeds is min..max.
"""

import json
import math
import statistics
from pathlib import Path


ARM_TITLES = {"es": "ES (trl_es.ESTrainer)", "grpo": "GRPO (trl.GRPOTrainer)"}


def accuracy_at(run: dict, axis: str, x: float) -> float:
    """Held-out accuracy of the last evaluation with ``run[axis] <= x`` (the start if none)."""
    best = run["eval_accuracy"][0]
    for position, accuracy in zip(run[axis], run["eval_accuracy"], strict=True):
        if position <= x:
            best = accuracy
    return best


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def _spread(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def choose_learning_rate(grid_runs: dict[float, list[dict]]) -> float | None:
    """The learning rate whose seeds reach the best mean final held-out accuracy (runs that failed are skipped)."""
    scored = {lr: _mean([r["final_eval_accuracy"] for r in runs]) for lr, runs in grid_runs.items() if runs}
    scored = {lr: score for lr, score in scored.items() if not math.isnan(score)}
    return max(scored, key=scored.get) if scored else None


def build_arm(settings: dict, grid_runs: dict[float, list[dict]], errors: list[dict]) -> dict:
    best = choose_learning_rate(grid_runs)
    runs = grid_runs.get(best, []) if best is not None else []
    arm = {
        "learning_rate": best,
        "settings": settings,
        "runs": runs,
        "mean_final_eval_accuracy": _mean([r["final_eval_accuracy"] for r in runs]),
        "errors": errors,
    }
    if len(grid_runs) > 1:
        arm["grid"] = [
            {"learning_rate": lr, "mean_final_eval_accuracy": _mean([r["final_eval_accuracy"] for r in rs])}
            for lr, rs in sorted(grid_runs.items())
        ]
    return arm


def summarize(arms: dict[str, dict]) -> dict:
    """Each arm at equal rollouts and at equal training wall-clock (the furthest point both arms reached)."""
    ready = {name: arm for name, arm in arms.items() if arm["runs"]}
    summary = {}
    if not ready:
        return summary
    for axis, key in (("rollouts", "equal_rollouts"), ("wall_clock_s", "equal_wall_clock_s")):
        point = min(run[axis][-1] for arm in ready.values() for run in arm["runs"])
        summary[key] = {"at": point}
        for name, arm in ready.items():
            values = [accuracy_at(run, axis, point) for run in arm["runs"]]
            summary[key][name] = {"mean": _mean(values), "std": _spread(values)}
    for name, arm in ready.items():
        runs = arm["runs"]
        summary[name] = {
            "start_accuracy": _mean([r["eval_accuracy"][0] for r in runs]),
            "final_accuracy": _mean([r["final_eval_accuracy"] for r in runs]),
            "final_accuracy_std": _spread([r["final_eval_accuracy"] for r in runs]),
            "peak_rss_mb": _mean([r["peak_rss_mb"] for r in runs]),
            "mean_step_s": _mean([r["mean_step_s"] for r in runs]),
            "rollouts": _mean([r["rollouts_total"] for r in runs]),
            "tokens_generated": _mean([r["tokens_generated"] for r in runs]),
            "train_seconds": _mean([r["train_seconds"] for r in runs]),
        }
    if "es" in summary and "grpo" in summary:
        summary["peak_rss_es_over_grpo"] = summary["es"]["peak_rss_mb"] / summary["grpo"]["peak_rss_mb"]
    return summary


def _verdict(summary: dict, key: str, unit: str) -> str:
    entry = summary.get(key)
    if not entry or "es" not in entry or "grpo" not in entry:
        return ""
    es, grpo = entry["es"]["mean"], entry["grpo"]["mean"]
    leader = "ES" if es > grpo else "GRPO" if grpo > es else "neither arm"
    return (
        f"- At equal {unit} ({entry['at']:,.0f}): ES {es:.3f} vs GRPO {grpo:.3f} held-out accuracy; "
        f"{leader} ahead by {abs(es - grpo):.3f}.\n"
    )


def markdown(report: dict) -> str:
    arms, summary, budget = report["arms"], report["summary"], report["budget"]
    seeds = budget["seeds"]
    lines = [
        f"Held-out accuracy (greedy, {report['config'].get('eval_examples', '?')} problems), "
        f"{len(seeds)} seed(s) {seeds}; budget {budget['rollouts']:,} rollouts"
        + (f" or {budget['seconds']:.0f} s of training" if budget.get("seconds") else "")
        + " per arm, whichever first.\n",
        "| arm | learning rate | start | final (mean ± std) | rollouts | train s | s / step | tokens | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        s = summary.get(name)
        if s is None:
            lines.append(
                f"| {ARM_TITLES[name]} | failed: {arm['errors'][0]['error'][:80] if arm['errors'] else '?'} |"
            )
            continue
        lines.append(
            f"| {ARM_TITLES[name]} | {arm['learning_rate']:g} | {s['start_accuracy']:.3f} | "
            f"{s['final_accuracy']:.3f} ± {s['final_accuracy_std']:.3f} | {s['rollouts']:,.0f} | "
            f"{s['train_seconds']:.0f} | {s['mean_step_s']:.3f} | {s['tokens_generated']:,.0f} | {s['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    lines.append(
        (_verdict(summary, "equal_rollouts", "rollouts") + _verdict(summary, "equal_wall_clock_s", "seconds")).rstrip()
    )
    if "peak_rss_es_over_grpo" in summary:
        lines.append(f"- Peak RSS ES / GRPO: {summary['peak_rss_es_over_grpo']:.2f}.")
    for name, arm in arms.items():
        if arm.get("grid"):
            grid = ", ".join(f"{g['learning_rate']:g}: {g['mean_final_eval_accuracy']:.3f}" for g in arm["grid"])
            lines.append(f"- {name} learning-rate grid (mean final accuracy): {grid}.")
    return "\n".join(lines).rstrip() + "\n"


def plot(report: dict, path: Path) -> bool:
    """Accuracy vs rollouts and vs training wall-clock, mean and min..max over seeds. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (axis, label) in zip(
        axes,
        (("rollouts", "rollouts (generated completions)"), ("wall_clock_s", "training wall-clock (s)")),
        strict=True,
    ):
        for name, arm in report["arms"].items():
            runs = arm["runs"]
            if not runs:
                continue
            end = max(run[axis][-1] for run in runs)
            xs = sorted({x for run in runs for x in run[axis] if x <= end})
            per_seed = [[accuracy_at(run, axis, x) for x in xs] for run in runs]
            mean = [statistics.fmean(column) for column in zip(*per_seed, strict=True)]
            low = [min(column) for column in zip(*per_seed, strict=True)]
            high = [max(column) for column in zip(*per_seed, strict=True)]
            line = ax.step(xs, mean, where="post", label=f"{ARM_TITLES[name]}, lr {arm['learning_rate']:g}")[0]
            ax.fill_between(xs, low, high, step="post", alpha=0.2, color=line.get_color())
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (greedy)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    seeds = report["budget"]["seeds"]
    figure.suptitle(f"ES vs GRPO, same base, prompts, rewards and budget; mean and min..max over {len(seeds)} seed(s)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(output_dir: Path, report: dict) -> None:
    report["summary"] = summarize(report["arms"])
    (output_dir / "compare.json").write_text(json.dumps(report, indent=2))
    (output_dir / "compare.md").write_text(markdown(report))
    plot(report, output_dir / "compare.png")
