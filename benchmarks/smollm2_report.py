"""The SmolLM2 comparison's report: its finished units -> ``docs/results/smollm2/smollm2.{json,md,png}``.

The numbers come from ``benchmarks.ladder_aggregate.aggregate`` (the scale ladder's rules: ES and GRPO over the seeds
both finished, at equal rollouts and at equal training wall-clock; an added arm such as ESSA against ES apart, over
the seeds those two finished). What this adds for a single model: the selection that chose each arm's setting, the
arms' learning curves (a figure of accuracy against rollouts and against wall-clock), and the machine the units ran
on, since wall-clock numbers are only comparable within one CPU kind.
"""

import json
import time
from pathlib import Path

from trl_es.compare.machine import describe_machine
from trl_es.compare.report import arm_title, mean_or_nan, plot

from .ladder import DerivedArm, write_json_atomic
from .ladder_aggregate import _final as finals_of
from .ladder_aggregate import _number, aggregate, load_units


def _final(final: dict | None, seeds: int) -> str:
    if not final:
        return "-"
    return f"{final['mean']:.3f} ± {final['std']:.3f}" if seeds > 1 else f"{final['mean']:.3f} (one seed)"


def _selection_lines(select_units: list[tuple[str, dict]], choice: dict) -> list[str]:
    """``select_units``: (what the phase's points are relative to, unit) pairs."""
    chosen = {point["point"] for point in choice.values()}
    lines = [
        "## Selection (one seed, validation = the last 500 training sums)",
        "",
        "| point | its settings | steps | validation | test (256) | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for base, done in sorted(select_units, key=lambda pair: pair[1]["unit"]["arm"]):
        run, name, command = done["run"], done["unit"]["arm"], done["command"]
        own = command[command.index("--compare.eval_points") + 2 :]
        # each family's step budget is the same for all its points (the table's steps column shows it)
        budget = (
            len(own) - 1 - own[::-1].index("--compare.budget_rollouts") if "--compare.budget_rollouts" in own else None
        )
        settings = own[:budget] + own[budget + 2 :] if budget is not None else own
        busy = "*" if run.get("machine", {}).get("busy") else ""
        lines.append(
            f"| {'**' + name + '**' if name in chosen else name} | {' '.join(settings) or f'(the base: {base})'} | "
            f"{run['steps']} | {run['final_validation_accuracy']:.3f} | {run['final_eval_accuracy']:.3f} | "
            f"{run['mean_step_s']:.0f}{busy} |"
        )
    return lines + [
        "",
        "Bold: the point each arm was measured at (the best validation accuracy of its family). \\*: the unit ran on "
        "a busy machine (its step budget keeps the accuracy; its time per step is not comparable).",
    ]


TABLE_HEAD = [
    "| arm | its setting | start | final (mean ± std) | steps | s / step | rollouts | training s | peak RSS MB |",
    "|---|---|---|---|---|---|---|---|---|",
]


def _arm_row(title: str, setting: str, runs: list[dict]) -> str:
    """One arm over its runs (the seeds of one comparison): means of what each run recorded."""

    def mean_of(key: str) -> float:
        return mean_or_nan([r[key] for r in runs])

    start = mean_or_nan([r["eval_accuracy"][0] for r in runs])
    return (
        f"| {title} | {setting} | {start:.3f} | {_final(finals_of(runs), len(runs))} | {mean_of('steps'):.0f} | "
        f"{mean_of('mean_step_s'):.0f} | {mean_of('rollouts_total'):,.0f} | {mean_of('train_seconds'):.0f} | "
        f"{mean_of('peak_rss_mb'):.0f} |"
    )


def _runs(units: list[dict], arm: str, seeds) -> list[dict]:
    return [d["run"] for d in units if d["unit"]["arm"] == arm and d["unit"]["seed"] in seeds]


def _setting(choice: dict, arm: str) -> str:
    return " ".join(choice.get(arm, {}).get("overrides", ())) or "(the recipe)"


def markdown(
    entry: dict, units: list[dict], select_units: list[tuple[str, dict]], choice: dict, built_on: dict | None
) -> str:
    # Units run before 2026-12-06 did not record their CPU kind; the rung records where it was first timed.
    unrecorded = "not recorded per unit" + (
        f" (the rung was timed on {describe_machine(built_on)})" if built_on else ""
    )
    machines = sorted(
        {describe_machine(d["machine"]["kind"]) if "kind" in d["machine"] else unrecorded for d in units}
    )
    lines = [
        "# ES vs GRPO on a real pretrained LLM: SmolLM2-135M-Instruct, chat arithmetic",
        "",
        f"builtin:smollm2-135m-instruct ({entry['parameters']:,} parameters, weights sha256 "
        f"{units[0]['rung']['weights_sha256'][:12]}...), recipe `recipes/smollm2_chat.yaml`, greedy accuracy on 256 "
        f"held-out test sums. Each unit trains one arm for {entry['budget_seconds']} s or "
        f"{entry['budget_rollouts']:,} rollouts, whichever comes first. Units ran on: {', '.join(machines)}; "
        f"busy units (wall-clock not comparable): {', '.join(entry['busy_units']) or 'none'}.",
        "",
        f"## ES and GRPO (seeds both finished: {', '.join(map(str, entry['seeds'])) or 'none yet'})",
        "",
        *TABLE_HEAD,
    ]
    evaluated = []
    for name in entry["arms"]:
        runs = _runs(units, name, entry["seeds"])
        lines.append(_arm_row(arm_title(name), _setting(choice, name), runs))
        evaluated.append(f"{name} at {', '.join(f'{x:,}' for x in runs[0]['rollouts'])}")
    if evaluated:
        lines += [
            "",
            f"Held-out evaluations (rollouts, seed {entry['seeds'][0]}): {'; '.join(evaluated)}. An arm's accuracy at "
            "a point is its last evaluation at or before it, so a comparison point just short of an arm's next "
            "evaluation understates that arm.",
        ]
    for key, label, unit in (("equal_rollouts", "equal rollouts", "rollouts"), ("equal_wall_clock", "equal training "
                             "wall-clock", "s")):  # fmt: skip
        at = entry.get(key)
        if at:
            lines.append(
                f"\nAt {label} ({at['at']:,.0f} {unit}, the furthest every run reached): ES "
                f"{at['es']['mean']:.3f} ± {at['es']['std']:.3f}, GRPO {at['grpo']['mean']:.3f} ± "
                f"{at['grpo']['std']:.3f}; ES - GRPO {_number(entry[f'es_minus_grpo_{key}'])}."
            )
    for name, derived in entry.get("derived", {}).items():
        seeds = len(derived["seeds"])
        lines += [
            "",
            f"## {name} against ES (seeds both finished: {', '.join(map(str, derived['seeds'])) or 'none yet'})",
            "",
            f"Settings: `{' '.join(derived['settings'])}`. ES final {_final(derived['es_final'], seeds)}, {name} "
            f"final {_final(derived['final'], seeds)}; ES - {name}: "
            f"{_number(derived[f'es_minus_{name}_equal_rollouts'])} at equal rollouts, "
            f"{_number(derived[f'es_minus_{name}_equal_wall_clock'])} at equal wall-clock.",
        ]
        if derived["seeds"]:  # the three arms side by side over these seeds (GRPO's where it has them)
            lines += ["", *TABLE_HEAD]
            for arm, title, setting in (
                (derived["runs_of"], name, " ".join(derived["settings"])),
                ("es", arm_title("es"), _setting(choice, "es")),
                ("grpo", arm_title("grpo"), _setting(choice, "grpo")),
            ):
                seeds = sorted({d["unit"]["seed"] for d in units if d["unit"]["arm"] == arm} & set(derived["seeds"]))
                if seeds:
                    label = title if seeds == derived["seeds"] else f"{title} (seeds {', '.join(map(str, seeds))})"
                    lines.append(_arm_row(label, setting, _runs(units, arm, seeds)))
    finished = {arm: seeds for arm, seeds in sorted(entry["units"].items()) if arm in ("es", "grpo")}
    if any(seeds != entry["seeds"] for seeds in finished.values()):
        lines += [
            "",
            f"Finished units by seed; those without a partner in the other arm are not in the table: {finished}",
        ]
    if select_units:
        lines += ["", *_selection_lines(select_units, choice)]
    return "\n".join(lines) + "\n"


def curves(units: list[dict], entry: dict, choice: dict, path: Path) -> bool:
    """Accuracy against rollouts and against wall-clock, each arm over the seeds its comparison pairs."""
    seeds_of = {"es": entry["seeds"], "grpo": entry["seeds"]}
    for name, derived in entry.get("derived", {}).items():
        seeds_of[name] = derived["seeds"]
    arms = {}
    for name, seeds in seeds_of.items():
        runs = [d["run"] for d in units if d["unit"]["arm"] == name and d["unit"]["seed"] in seeds]
        if runs:
            point = choice.get(name, {}).get("point")
            arms[name] = {"runs": runs, "selected": {"point": point} if point else {}, "settings": {}}
    if not arms:
        return False
    busy = bool(entry["busy_units"])
    return plot({"arms": arms, "budget": {"seeds": sorted(set(entry["seeds"]))}, "machine": {"busy": busy}}, path)


def write_report(
    results: Path, rung: str, choice: dict, added: tuple[DerivedArm, ...] = (), selection: dict[str, str] | None = None
) -> dict | None:
    """``results/smollm2.{json,md,png}`` from ``results/measure``, with the selection table from the phases in
    ``selection`` (folder name -> what its points' settings are relative to); None while no measurement unit has
    finished."""
    entries = aggregate(results / "measure", (rung,), added)
    if not entries:
        return None
    entry = entries[0]
    units = load_units(results / "measure")
    select_units = [(base, unit) for phase, base in (selection or {}).items() for unit in load_units(results / phase)]
    report = {
        "comparison": entry,
        "selected": choice,
        "generated_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_json_atomic(results / "smollm2.json", report)
    built_on = json.loads((results / "measure" / "rungs.json").read_text())[rung].get("built_on")
    (results / "smollm2.md").write_text(markdown(entry, units, select_units, choice, built_on))
    curves(units, entry, choice, results / "smollm2.png")
    return report
