"""The scale ladder's aggregate: the finished unit files of ``benchmarks.ladder`` -> per-rung gaps, a markdown
table and a figure (``docs/results/scale_ladder.{json,md,png}``).

A rung's main comparison is every plain arm (``es``, ``grpo``, ES variants) over the seeds all of them finished; each
derived arm is compared to ES apart, over the seeds those two finished, so that adding an arm to a running ladder
changes nothing in the numbers already reported.
"""

import json
import math
import time
from pathlib import Path

from trl_es.compare.report import mean_or_nan, spread_or_nan, summarize

from .ladder import DerivedArm, write_json_atomic


def load_units(results: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(results.glob("*/*_seed*.json"))]


def _gap(entry: dict, arm: str, reference: str = "grpo") -> float | None:
    if not entry or arm not in entry or reference not in entry:
        return None
    return entry[arm]["mean"] - entry[reference]["mean"]


def _final(arm_runs: list[dict]) -> dict:
    values = [r["final_eval_accuracy"] for r in arm_runs]
    return {"mean": mean_or_nan(values), "std": spread_or_nan(values)}


def _against_derived(arm: DerivedArm, rung: str, done: list[dict]) -> dict:
    """ES against one derived arm at one rung, over the seeds both finished (the base arm's units where the derived
    arm has no settings of its own there)."""
    source = arm.name if arm.overrides(rung) else arm.base
    runs = {name: {d["unit"]["seed"]: d["run"] for d in done if d["unit"]["arm"] == name} for name in ("es", source)}
    seeds = sorted(set(runs["es"]) & set(runs[source]))
    es_runs, arm_runs = ([runs[name][seed] for seed in seeds] for name in ("es", source))
    summary = summarize({"es": {"runs": es_runs}, arm.name: {"runs": arm_runs}}) if seeds else {}
    return {
        "seeds": seeds,
        "runs_of": source,
        "settings": list(arm.overrides(rung)),
        "es_final": _final(es_runs) if seeds else None,
        "final": _final(arm_runs) if seeds else None,
        f"es_minus_{arm.name}_equal_rollouts": _gap(summary.get("equal_rollouts"), "es", arm.name),
        f"es_minus_{arm.name}_equal_wall_clock": _gap(summary.get("equal_wall_clock_s"), "es", arm.name),
        "equal_rollouts": summary.get("equal_rollouts"),
        "equal_wall_clock": summary.get("equal_wall_clock_s"),
    }


def aggregate(
    results: Path, rung_order: tuple[str, ...] | None = None, derived_arms: tuple[DerivedArm, ...] = ()
) -> list[dict]:
    """One entry per rung from the unit files there are: every arm at equal rollouts and at equal training
    wall-clock over the seeds that every arm of the rung has finished (paired seeds), and the gaps to GRPO; each
    derived arm against ES apart (under ``derived``), over the seeds those two finished, so that adding an arm
    changes nothing in the main comparison."""
    store_path = results / "rungs.json"
    records = json.loads(store_path.read_text()) if store_path.exists() else {}
    by_rung: dict[str, list[dict]] = {}
    for done in load_units(results):
        rung = done["unit"]["rung"]
        record = records.get(rung)
        if record is None or done["rung"]["weights_sha256"] != record["weights_sha256"]:
            raise ValueError(
                f"unit {rung}/{done['unit']['arm']}_seed{done['unit']['seed']} ran on weights "
                f"{done['rung']['weights_sha256'][:12]}..., not the rung's recorded policy ({store_path})"
            )
        if done["ladder"] != record["ladder"]:
            raise ValueError(f"unit {rung}/{done['unit']['arm']}_seed{done['unit']['seed']} ran under other ladder "
                             f"settings ({done['ladder']}) than its rung ({record['ladder']})")  # fmt: skip
        by_rung.setdefault(rung, []).append(done)
    order = list(rung_order or ()) + sorted(set(by_rung) - set(rung_order or ()))
    entries = []
    derived_names = {arm.name for arm in derived_arms}
    for rung in [name for name in order if name in by_rung]:
        done = by_rung[rung]
        seeds_of = {}
        for arm in sorted(
            {d["unit"]["arm"] for d in done}, key=lambda a: (a in derived_names, a == "grpo", a != "es", a)
        ):
            seeds_of[arm] = sorted(d["unit"]["seed"] for d in done if d["unit"]["arm"] == arm)
        arms = [arm for arm in seeds_of if arm not in derived_names]
        # seeds every arm of the rung finished, GRPO included: a gap needs both sides of the same seed
        paired = sorted(set(seeds_of.get("grpo", ())).intersection(*(set(seeds_of[arm]) for arm in arms)))
        runs = {
            arm: [d["run"] for d in done if d["unit"]["arm"] == arm and d["unit"]["seed"] in paired] for arm in arms
        }
        summary = summarize({arm: {"runs": arm_runs} for arm, arm_runs in runs.items()}) if paired else {}
        record = records[rung]
        entry = {
            "rung": rung,
            "parameters": record["parameters"],
            "seeds": paired,
            "units": seeds_of,
            "budget_rollouts": record["budget_rollouts"],
            "budget_seconds": record["budget_seconds"],
            "generation_cost_vs_smallest": record["generation_cost_vs_smallest"],
            "es_minus_grpo_equal_wall_clock": _gap(summary.get("equal_wall_clock_s"), "es"),
            "es_minus_grpo_equal_rollouts": _gap(summary.get("equal_rollouts"), "es"),
            "equal_wall_clock": summary.get("equal_wall_clock_s"),
            "equal_rollouts": summary.get("equal_rollouts"),
            "arms": {
                arm: {
                    "start_accuracy": mean_or_nan([r["eval_accuracy"][0] for r in arm_runs]),
                    "final_accuracy": _final(arm_runs),
                    "train_seconds": mean_or_nan([r["train_seconds"] for r in arm_runs]),
                    "rollouts": mean_or_nan([r["rollouts_total"] for r in arm_runs]),
                    "peak_rss_mb": mean_or_nan([r["peak_rss_mb"] for r in arm_runs]),
                    "stopped_by": sorted({r["stopped_by"] for r in arm_runs}),
                }
                for arm, arm_runs in runs.items()
                if arm_runs
            },
            "busy_units": [
                f"{d['unit']['arm']}_seed{d['unit']['seed']}" for d in done if d["run"].get("machine", {}).get("busy")
            ],
        }
        for arm in arms:
            if arm not in ("es", "grpo"):
                entry[f"{arm}_minus_grpo_equal_wall_clock"] = _gap(summary.get("equal_wall_clock_s"), arm)
                entry[f"{arm}_minus_grpo_equal_rollouts"] = _gap(summary.get("equal_rollouts"), arm)
        if derived_arms:
            entry["derived"] = {arm.name: _against_derived(arm, rung, done) for arm in derived_arms}
        entries.append(entry)
    return entries


def _number(value, digits=3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.{digits}f}"


def markdown(entries: list[dict]) -> str:
    lines = [
        "# Scale ladder: ES - GRPO held-out accuracy by policy size",
        "",
        "Each rung: the seeds both arms finished (mean ± population std over them). Gaps are ES minus GRPO "
        "(negative: GRPO ahead) at the furthest rollout count and training time every run of the rung reached.",
        "",
        "| rung | parameters | seeds | budget (rollouts / s) | start | ES final | GRPO final | gap, equal rollouts "
        "| gap, equal wall-clock | busy units |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        final = {arm: e["arms"].get(arm, {}).get("final_accuracy") for arm in ("es", "grpo")}
        starts = {round(arm["start_accuracy"], 3) for arm in e["arms"].values()}
        start = ", ".join(f"{value:.3f}" for value in sorted(starts)) or "-"
        cells = [
            f"{f['mean']:.3f} ± {f['std']:.3f}" if f else "-" for f in (final["es"], final["grpo"])
        ]  # fmt: skip
        lines.append(
            f"| {e['rung']} | {e['parameters']:,} | {len(e['seeds'])} ({', '.join(map(str, e['seeds']))}) | "
            f"{e['budget_rollouts']:,} / {e['budget_seconds']} | {start} | {cells[0]} | {cells[1]} | "
            f"{_number(e['es_minus_grpo_equal_rollouts'])} | {_number(e['es_minus_grpo_equal_wall_clock'])} | "
            f"{', '.join(e['busy_units']) or 'none'} |"
        )
    derived = [(e, name, d) for e in entries for name, d in e.get("derived", {}).items()]
    if derived:
        lines += [
            "",
            "Derived arms, each against ES over the seeds both finished (where a derived arm has no settings of its "
            "own at a rung, its base arm's units stand for it):",
            "",
            "| rung | arm | its settings | seeds | ES final | arm final | ES - arm, equal rollouts "
            "| ES - arm, equal wall-clock |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e, name, d in derived:
            es_final, arm_final = (
                f"{f['mean']:.3f} ± {f['std']:.3f}" if d["seeds"] else "-" for f in (d["es_final"], d["final"])
            )
            settings = " ".join(d["settings"]) or f"(= {d['runs_of']})"
            lines.append(
                f"| {e['rung']} | {name} | {settings} | {len(d['seeds'])} | {es_final} | {arm_final} | "
                f"{_number(d[f'es_minus_{name}_equal_rollouts'])} | "
                f"{_number(d[f'es_minus_{name}_equal_wall_clock'])} |"
            )
    unpaired = {
        e["rung"]: e["units"]
        for e in entries
        if any(len(seeds) != len(e["seeds"]) for arm, seeds in e["units"].items() if arm not in e.get("derived", {}))
    }
    if unpaired:
        lines += ["", f"Units finished but not yet paired across arms (not in the table): {unpaired}"]
    return "\n".join(lines) + "\n"


def plot(entries: list[dict], path: Path) -> bool:
    """Gap against parameters (log x): ES - GRPO solid, ES - each derived arm dashed."""
    labels = {
        ("", "es_minus_grpo_equal_wall_clock"): "ES - GRPO, equal training wall-clock",
        ("", "es_minus_grpo_equal_rollouts"): "ES - GRPO, equal rollouts",
    }
    for name in sorted({name for e in entries for name in e.get("derived", {})}):
        labels[(name, f"es_minus_{name}_equal_wall_clock")] = f"ES - {name}, equal training wall-clock"
        labels[(name, f"es_minus_{name}_equal_rollouts")] = f"ES - {name}, equal rollouts"
    points = {}
    for derived, key in labels:
        values = [
            (e["parameters"], (e.get("derived", {}).get(derived) or {} if derived else e).get(key)) for e in entries
        ]
        points[(derived, key)] = [(x, y) for x, y in values if y is not None]
    if not any(points.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (derived, key), pairs in points.items():
        if pairs:
            axis.plot(
                *zip(*pairs, strict=True), marker="o", linestyle="--" if derived else "-", label=labels[(derived, key)]
            )
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("policy parameters")
    axis.set_ylabel("held-out accuracy gap")
    axis.set_title("scale ladder (mean over paired seeds)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_aggregate(
    results: Path, output: Path, rung_order: tuple[str, ...] | None = None, derived_arms: tuple[DerivedArm, ...] = ()
) -> list[dict]:
    """``OUTPUT.json`` / ``.md`` / ``.png`` (the figure only once some rung has a gap) from the unit files."""
    entries = aggregate(results, rung_order, derived_arms)
    write_json_atomic(
        output.with_suffix(".json"),
        {"rungs": entries, "generated_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    )
    output.with_suffix(".md").write_text(markdown(entries))
    plot(entries, output.with_suffix(".png"))
    return entries
