"""Does the ES-GRPO gap shrink with model size? The scale ladder, run as units that each fit a session.

    python benchmarks/scale_ladder.py --status                      # which units are done, what is next
    python benchmarks/scale_ladder.py --resume --max_minutes 120    # run unfinished units until the time is up
    python benchmarks/scale_ladder.py --aggregate                   # docs/results/scale_ladder.{json,md,png}

A unit is one (rung, arm, seed): ``trl-es compare --config recipes/quickstart.yaml --arms ARM --seed SEED`` on the
rung's policy, in a process of its own; it writes ``docs/results/scale_ladder/<rung>/<arm>_seed<seed>.json`` when it
finishes, and nothing when it is stopped (see ``benchmarks/ladder.py``). ``--resume`` skips the finished units,
starts a unit only if its estimated duration fits the minutes left, kills and discards one that overruns, and
re-aggregates after every finished unit, so commit ``docs/results/`` before the session ends.

The rungs are ``benchmarks.build_policy.SIZES`` (one Qwen2-style family, one task and tokenizer; the 0.6M rung is
the shipped policy, the others are rebuilt from their seed here and checked against the recorded weight hash). The
budget rule is the same at every rung: ``BUDGET_ROLLOUTS`` generated completions, or ``BASE_SECONDS`` of training
times the rung's measured generation cost relative to the 0.6M rung, whichever an arm reaches first. Every other
setting is the quickstart recipe's (ES: full space, N=32, sigma 0.01, SGD 4e-4; GRPO: 8 samples, AdamW 6e-4).
Run it on a machine doing nothing else: each unit records the load (``machine``), and busy units are listed.
"""

import argparse
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.build_policy import BASE_WIDTH, SIZES  # noqa: E402
from benchmarks.ladder import DerivedArm, Ladder, RungStore, estimate_seconds, resume, units  # noqa: E402
from benchmarks.ladder_aggregate import write_aggregate  # noqa: E402


# The experiment. Half the quickstart comparison's budget (307,200 rollouts / 300 s), so that the largest rung's units
# fit well inside a session (its wall-clock budget is BASE_SECONDS x its generation cost); see the README.
BUDGET_ROLLOUTS = 153_600
BASE_SECONDS = 150
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def grpo_width_scaled_lr() -> DerivedArm:
    """GRPO with the recipe's learning rate (tuned on the 0.6M policy) times BASE_WIDTH / hidden size: the rule the
    policies' own SFT is built by (``build_policy.sft_learning_rate``; Adam's step on a wider layer must shrink as
    1 / width). Added after the recipe's 6e-4 sent GRPO to accuracy 0 on the 14M rung, so that the gap at a rung
    measures ES against a GRPO that still learns there. At 0.6M it is the ``grpo`` arm itself."""
    base = yaml.safe_load(RECIPE.read_text())["grpo"]["learning_rate"]
    settings = tuple(
        (rung, ("--grpo.learning_rate", f"{base * BASE_WIDTH / hidden:.3g}"))
        for rung, (hidden, _, _) in SIZES.items()
        if hidden != BASE_WIDTH
    )
    return DerivedArm("grpo_width_lr", "grpo", settings)


LADDER = Ladder(
    recipe=str(RECIPE),
    budget_rollouts=BUDGET_ROLLOUTS,
    base_seconds=BASE_SECONDS,
    derived_arms=(grpo_width_scaled_lr(),),
)
RESULTS = ROOT / "docs" / "results" / "scale_ladder"
AGGREGATE = ROOT / "docs" / "results" / "scale_ladder.json"


def status(ladder: Ladder, store: RungStore, selected) -> None:
    for unit in units(ladder):
        if not selected(unit):
            continue
        path = unit.result_path(store.results)
        if path.exists():
            done = json.loads(path.read_text())
            final = done["run"]["final_eval_accuracy"]
            print(f"done     {unit.name:<22} {done['duration_s']:>6.0f} s  final held-out accuracy {final:.3f}")
        elif store.known_mismatch(unit.rung):
            print(
                f"pending  {unit.name:<22} (not here: this machine kind rebuilds the rung's policy with other weights)"
            )
        elif unit.rung in store.records:
            print(f"pending  {unit.name:<22} ~{estimate_seconds(unit, ladder, store) / 60:>4.0f} min (estimate)")
        else:
            print(f"pending  {unit.name:<22} (rung not prepared yet: its policy is built and timed first)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--resume", action="store_true", help="run unfinished units until --max_minutes")
    action.add_argument("--aggregate", action="store_true", help="write the aggregate from the finished units")
    action.add_argument("--status", action="store_true", help="list finished and pending units")
    parser.add_argument("--max_minutes", type=float, default=None, help="time limit for --resume (required there)")
    parser.add_argument("--rungs", nargs="+", default=None, help="subset of rungs to run (default: all)")
    parser.add_argument("--arms", nargs="+", default=None, help="subset of arms to run (default: es grpo)")
    parser.add_argument("--results_dir", default=str(RESULTS))
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "scale_ladder"), help="runs and built policies")
    args = parser.parse_args(argv)
    ladder = LADDER
    unknown = set(args.rungs or ()) - set(ladder.rungs) | set(args.arms or ()) - set(ladder.arm_names)
    if unknown:
        parser.error(
            f"unknown {sorted(unknown)}: the ladder's rungs are {list(ladder.rungs)}, arms {list(ladder.arm_names)}"
        )

    def selected(unit) -> bool:
        return unit.rung in (args.rungs or ladder.rungs) and unit.arm in (args.arms or ladder.arm_names)

    results, work = Path(args.results_dir), Path(args.work_dir)
    store = RungStore(results=results, cache=work / "policies")
    output = results.parent / "scale_ladder.json" if args.results_dir != str(RESULTS) else AGGREGATE
    if args.status:
        status(ladder, store, selected)
        return 0
    if args.aggregate:
        entries = write_aggregate(results, output, ladder.rungs, ladder.derived_arms)
        print(output.with_suffix(".md").read_text())
        return 0 if entries else 1
    if args.max_minutes is None:
        parser.error("--resume needs --max_minutes (the time this session can give the ladder)")
    outcome = resume(
        ladder,
        store,
        work,
        args.max_minutes,
        selected=selected,
        on_finished=lambda: write_aggregate(results, output, ladder.rungs, ladder.derived_arms),
    )
    print(json.dumps(outcome, indent=2))
    return 1 if outcome["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
