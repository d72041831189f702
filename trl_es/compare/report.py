"""compare.json, compare.md and compare.png from the arms' run records.

Accuracy "at" a budget point is the last held-out evaluation at or before it (what a run stopped there would have
delivered); nothing is interpolated between evaluations. Spread over seeds is the population std.

Every number in the result table is measured on the held-out test split. With a grid, each arm's grid point is
chosen on the validation split (carved from the training data, disjoint from test): the best mean final validation
accuracy over seeds. The test accuracy of the points not chosen is kept in their run records but never used to choose.
"""

import json
import math
import statistics
from pathlib import Path


ARM_TITLES = {"es": "ES (trl_es.ESTrainer)", "grpo": "GRPO (trl.GRPOTrainer)"}
SELECTION_METRIC = "final_validation_accuracy"


def arm_title(name: str) -> str:
    return ARM_TITLES.get(name, f"ES variant `{name}`")


def point_label(point: dict) -> str:
    """A grid point as text: ``learning_rate=0.0004, sigma=0.02`` (empty for the arm's own settings)."""
    return ", ".join(
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in point.items()
    )


def accuracy_at(run: dict, axis: str, x: float) -> float:
    """Held-out accuracy of the last evaluation with ``run[axis] <= x`` (the start if none)."""
    best = run["eval_accuracy"][0]
    for position, accuracy in zip(run[axis], run["eval_accuracy"], strict=True):
        if position <= x:
            best = accuracy
    return best


def mean_or_nan(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def spread_or_nan(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def choose_grid_point(grid_runs: dict[str, list[dict]]):
    """The grid point (key of ``grid_runs``) whose seeds reach the best mean final *validation* accuracy; runs that
    failed are skipped. A single point needs no choice. Several points without validation numbers raise: choosing
    on the test split would flatter every arm by its own grid."""
    finished = {key: runs for key, runs in grid_runs.items() if runs}
    if len(finished) <= 1:
        return next(iter(finished), None)
    if any(run.get(SELECTION_METRIC) is None for runs in finished.values() for run in runs):
        raise ValueError(
            "a grid is chosen on the validation split, but some runs have no validation accuracy "
            "(set compare.validation_size)"
        )
    scored = {key: mean_or_nan([r[SELECTION_METRIC] for r in runs]) for key, runs in finished.items()}
    scored = {key: score for key, score in scored.items() if not math.isnan(score)}
    return max(scored, key=scored.get) if scored else None


def build_arm(
    settings: dict,
    grid_runs: dict[str, list[dict]],
    errors: list[dict],
    points: dict[str, dict] | None = None,
    kind: str = "es",
    variant: dict | None = None,
) -> dict:
    """One arm's record: its selected grid point's runs and, with a grid, every point's validation score."""
    best = choose_grid_point(grid_runs)
    runs = grid_runs.get(best, []) if best is not None else []
    arm = {
        "kind": kind,
        "settings": settings,
        "selected": (points or {}).get(best, {}) if best is not None else None,
        "learning_rate": runs[0]["learning_rate"] if runs else None,
        "runs": runs,
        "mean_final_eval_accuracy": mean_or_nan([r["final_eval_accuracy"] for r in runs]),
        "mean_final_validation_accuracy": mean_or_nan([r.get(SELECTION_METRIC) for r in runs]),
        "errors": errors,
    }
    if variant is not None:
        arm["variant"] = variant
    if len(grid_runs) > 1:
        arm["grid"] = [
            {
                "point": (points or {}).get(key, {}),
                "mean_final_validation_accuracy": mean_or_nan([r.get(SELECTION_METRIC) for r in rs]),
                "seeds": len(rs),
            }
            for key, rs in grid_runs.items()
        ]
    return arm


def summarize(arms: dict[str, dict]) -> dict:
    """Every arm at equal rollouts and at equal training wall-clock (the furthest point every arm reached)."""
    ready = {name: arm for name, arm in arms.items() if arm["runs"]}
    summary = {}
    if not ready:
        return summary
    for axis, key in (("rollouts", "equal_rollouts"), ("wall_clock_s", "equal_wall_clock_s")):
        point = min(run[axis][-1] for arm in ready.values() for run in arm["runs"])
        summary[key] = {"at": point}
        for name, arm in ready.items():
            values = [accuracy_at(run, axis, point) for run in arm["runs"]]
            summary[key][name] = {"mean": mean_or_nan(values), "std": spread_or_nan(values)}
    for name, arm in ready.items():
        runs = arm["runs"]
        summary[name] = {
            "start_accuracy": mean_or_nan([r["eval_accuracy"][0] for r in runs]),
            "final_accuracy": mean_or_nan([r["final_eval_accuracy"] for r in runs]),
            "final_accuracy_std": spread_or_nan([r["final_eval_accuracy"] for r in runs]),
            "final_validation_accuracy": mean_or_nan([r.get(SELECTION_METRIC) for r in runs]),
            "peak_rss_mb": mean_or_nan([r["peak_rss_mb"] for r in runs]),
            "mean_step_s": mean_or_nan([r["mean_step_s"] for r in runs]),
            "rollouts": mean_or_nan([r["rollouts_total"] for r in runs]),
            "tokens_generated": mean_or_nan([r["tokens_generated"] for r in runs]),
            "train_seconds": mean_or_nan([r["train_seconds"] for r in runs]),
            "busy_runs": sum(bool(r.get("machine", {}).get("busy")) for r in runs),
        }
    if "es" in summary and "grpo" in summary:
        summary["peak_rss_es_over_grpo"] = summary["es"]["peak_rss_mb"] / summary["grpo"]["peak_rss_mb"]
    return summary


def _verdict(summary: dict, key: str, unit: str) -> str:
    entry = summary.get(key)
    means = {name: value["mean"] for name, value in (entry or {}).items() if name != "at"}
    if len(means) < 2:
        return ""
    ranked = sorted(means, key=means.get, reverse=True)
    gap = means[ranked[0]] - means[ranked[1]]
    leader = f"{ranked[0]} ahead of {ranked[1]} by {gap:.3f}" if gap > 0 else f"{ranked[0]} and {ranked[1]} tied"
    listed = ", ".join(f"{name} {means[name]:.3f}" for name in ranked)
    return f"- At equal {unit} ({entry['at']:,.0f}): {listed} held-out accuracy; {leader}.\n"


def _machine_lines(report: dict) -> list[str]:
    machine = report.get("machine")
    if not machine:
        return []
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    loads = f"load average (1/5/15 min) {start} at the start, {end} at the end, on {machine['cores']} cores"
    if not machine.get("busy"):
        return [f"Machine: not busy ({loads}).", ""]
    why = []
    if machine.get("busy_at_start"):
        why.append("loaded before the first run")
    if machine.get("busy_runs"):
        why.append(f"busy during {', '.join(machine['busy_runs'])}")
    return [
        f"**Busy machine** ({'; '.join(why)}; {loads}): the wall-clock columns and the equal-wall-clock comparison "
        f"are not comparable with runs on an idle machine. Rule: {machine['busy_rule']}",
        "",
    ]


def markdown(report: dict) -> str:
    arms, summary, budget = report["arms"], report["summary"], report["budget"]
    seeds = budget["seeds"]
    splits = report.get("splits", {})
    selection = (
        f"; grid points chosen on the validation split ({splits.get('validation_examples')} rows carved from "
        "training, disjoint from test)"
        if splits.get("selected_on")
        else ""
    )
    lines = [
        f"Held-out test accuracy (greedy, {report['config'].get('eval_examples', '?')} problems), "
        f"{len(seeds)} seed(s) {seeds}; budget {budget['rollouts']:,} rollouts"
        + (f" or {budget['seconds']:.0f} s of training" if budget.get("seconds") else "")
        + f" per arm, whichever first{selection}.\n",
        *_machine_lines(report),
        "| arm | learning rate | selected | start | final (mean ± std) | rollouts | train s | s / step | tokens | "
        "peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        s = summary.get(name)
        title = arm_title(name)
        if s is None:
            lines.append(f"| {title} | failed: {arm['errors'][0]['error'][:80] if arm['errors'] else '?'} |")
            continue
        selected = point_label(arm["selected"]) or "—"
        if arm.get("grid"):
            selected += f" (validation {s['final_validation_accuracy']:.3f})"
        busy = f" ({s['busy_runs']} busy)" if s["busy_runs"] else ""
        # CMA-ES has no learning rate: its step size is cma_sigma0
        cma = arm["settings"].get("strategy") == "cma"
        lr = f"{arm['learning_rate']:g}" if arm["learning_rate"] is not None and not cma else "—"
        lines.append(
            f"| {title} | {lr} | {selected} | {s['start_accuracy']:.3f} | "
            f"{s['final_accuracy']:.3f} ± {s['final_accuracy_std']:.3f} | {s['rollouts']:,.0f} | "
            f"{s['train_seconds']:.0f}{busy} | {s['mean_step_s']:.3f} | {s['tokens_generated']:,.0f} | "
            f"{s['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    lines.append(
        (_verdict(summary, "equal_rollouts", "rollouts") + _verdict(summary, "equal_wall_clock_s", "seconds")).rstrip()
    )
    if "peak_rss_es_over_grpo" in summary:
        lines.append(f"- Peak RSS ES / GRPO: {summary['peak_rss_es_over_grpo']:.2f}.")
    for name, arm in arms.items():
        if arm.get("variant") is not None:
            lines.append(f"- `{name}`: the ES arm's settings with {point_label(arm['variant']) or 'nothing changed'}.")
    for name, arm in arms.items():
        if arm.get("grid"):
            grid = ", ".join(
                f"{point_label(g['point'])}: {g['mean_final_validation_accuracy']:.3f}" for g in arm["grid"]
            )
            lines.append(f"- {name} grid (mean final validation accuracy): {grid}.")
    return "\n".join(lines).rstrip() + "\n"


def plot(report: dict, path: Path) -> bool:
    """Accuracy vs rollouts and vs training wall-clock, mean and min..max over seeds. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # an arm added to a running comparison may have fewer seeds so far: then each label says how many
    seed_counts = {len(arm["runs"]) for arm in report["arms"].values() if arm["runs"]}
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
            if arm["selected"]:
                setting = point_label(arm["selected"])
            elif arm["settings"].get("strategy") == "cma":  # no learning rate: its step size
                setting = f"cma_sigma0 {arm['settings'].get('cma_sigma0', '?')}"
            else:
                setting = f"lr {arm['learning_rate']:g}" if arm["learning_rate"] is not None else ""
            if len(seed_counts) > 1:
                setting += f"{', ' if setting else ''}{len(runs)} seed(s)"
            line = ax.step(xs, mean, where="post", label=f"{arm_title(name)}" + (f", {setting}" if setting else ""))[0]
            ax.fill_between(xs, low, high, step="post", alpha=0.2, color=line.get_color())
        ax.set_xlabel(label)
        ax.set_ylabel("held-out test accuracy (greedy)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=7)
    seeds = report["budget"]["seeds"]
    over = f"{len(seeds)} seed(s)" if len(seed_counts) <= 1 else "each arm's seeds (in the legend)"
    busy = " — BUSY MACHINE: wall-clock not comparable" if report.get("machine", {}).get("busy") else ""
    figure.suptitle(f"Same base, prompts, rewards and budget; mean and min..max over {over}{busy}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(output_dir: Path, report: dict) -> None:
    report["summary"] = summarize(report["arms"])
    (output_dir / "compare.json").write_text(json.dumps(report, indent=2))
    (output_dir / "compare.md").write_text(markdown(report))
    plot(report, output_dir / "compare.png")
