"""The scale ladder as independent units: does the ES-GRPO gap change with the policy's size?

A *rung* is one policy of a family that differs only in size (``benchmarks.build_policy.SIZES``: one task, one
tokenizer, each policy SFT-trained into the same starting-accuracy band). A *unit* is one (rung, arm, seed): one
``trl-es compare --arms ARM --seed SEED`` run in a process of its own. A unit writes its result file
(``RESULTS/<rung>/<arm>_seed<seed>.json``) only when it has finished; a unit stopped part-way (the time limit, a
crash, the session ending) leaves no result file and its work folder is deleted, so a partial run is never reported.
``resume`` skips the finished units and runs the next ones that still fit before a deadline, which is what lets the
ladder accumulate over sessions that are each shorter than the whole ladder. ``ladder_aggregate`` turns whatever
units exist into ``scale_ladder.json``, a markdown table and a figure. A *derived arm* (:class:`DerivedArm`) is an
arm with settings of its own at some rungs (GRPO at a rescaled learning rate); it can join a ladder that has run.

Budget rule, the same at every rung and fixed the first time a rung runs (recorded in ``RESULTS/rungs.json``, so
units run in later sessions use the very same budget):

* rollouts: ``budget_rollouts`` generated completions at every rung, so "equal rollouts" means the same data;
* seconds: ``base_seconds`` times the rung's cost of one batched greedy generation relative to the smallest rung
  (measured when the rung is first prepared), so a bigger model gets proportionally more training time for the same
  work. Every arm stops at whichever budget it reaches first, so no unit trains longer than its rung's
  ``budget_seconds``; the rest of a unit is model loading and held-out evaluation.

A rung's policy is rebuilt from its seed in every session (they are too large to commit). Its weights are hashed and
the hash is recorded with the rung: a rebuild that gives other weights is refused rather than mixed into old units.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from trl_es.builtin_models import weights_sha256
from trl_es.compare.machine import describe_machine, load_average, machine_kind, wait_until_quiet


@dataclass(frozen=True)
class DerivedArm:
    """A ladder arm that is another one (``base``: ``es``, ``grpo`` or a variant) with settings of its own at some
    rungs, e.g. GRPO with its learning rate rescaled to the rung's width. At a rung it has no settings for it *is* the
    base arm: it has no units there, and the base arm's units stand for it."""

    name: str
    base: str
    settings: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (rung, ("--grpo.learning_rate", "3e-4", ...)), ...

    def overrides(self, rung: str) -> tuple[str, ...]:
        return dict(self.settings).get(rung, ())


@dataclass(frozen=True)
class Ladder:
    """What every unit of one ladder shares. Changing a field changes the experiment: units recorded under other
    values are refused by :func:`aggregate` (the rung record keeps the values its units ran with)."""

    recipe: str
    budget_rollouts: int
    base_seconds: float
    eval_points: int = 10
    rungs: tuple[str, ...] = ("0.6M", "3M", "14M")
    arms: tuple[str, ...] = ("es", "grpo")
    seeds: tuple[int, ...] = (42, 43, 44)
    # A unit must fit a session with room to spare: a rung whose budget would exceed this is refused.
    max_unit_seconds: float = 40 * 60
    extra_overrides: tuple[str, ...] = ()  # more `--key value` pairs for every unit, e.g. a smaller held-out split
    # Arms added to an existing ladder. Not part of the fingerprint: adding one leaves the recorded units valid, and
    # its own settings are in its units' files (command, settings).
    derived_arms: tuple[DerivedArm, ...] = ()

    @property
    def arm_names(self) -> tuple[str, ...]:
        return self.arms + tuple(arm.name for arm in self.derived_arms)

    def compare_arm(self, unit: "Unit") -> tuple[str, tuple[str, ...]]:
        """The ``trl-es compare`` arm a unit runs and the overrides of its own."""
        for arm in self.derived_arms:
            if arm.name == unit.arm:
                return arm.base, arm.overrides(unit.rung)
        return unit.arm, ()

    def fingerprint(self) -> dict:
        # The recipe by its values, not its path: the same ladder runs from different checkouts in different sessions,
        # and a changed value (not a changed comment) makes a different experiment.
        values = yaml.safe_load(Path(self.recipe).read_text())
        return {
            "recipe": Path(self.recipe).name,
            "recipe_sha256": hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest(),
            "budget_rollouts": self.budget_rollouts,
            "base_seconds": self.base_seconds,
            "eval_points": self.eval_points,
            "extra_overrides": list(self.extra_overrides),
        }


@dataclass(frozen=True)
class Unit:
    rung: str
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.rung}/{self.arm}_seed{self.seed}"

    def result_path(self, results: Path) -> Path:
        return results / self.rung / f"{self.arm}_seed{self.seed}.json"


def units(ladder: Ladder) -> list[Unit]:
    """Every unit, rung by rung (smallest first), each rung's seeds in order, the arms of a seed together (a derived
    arm only where it has settings of its own): a session completes the cheap rungs first, and a large rung's policy,
    rebuilt in every session that runs its units, is built by as few sessions as possible."""
    return [
        Unit(rung, arm, seed)
        for rung in ladder.rungs
        for seed in ladder.seeds
        for arm in ladder.arms + tuple(d.name for d in ladder.derived_arms if d.overrides(rung))
    ]


def parameter_count(model_dir: Path) -> int:
    """Parameters stored in the policy's weights file (a tied embedding is stored, and counted, once)."""
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as file:
        return sum(math.prod(file.get_slice(name).get_shape()) for name in file.keys())


def generation_seconds(model_dir: Path, rows: int = 128, repeats: int = 5, max_new_tokens: int = 4) -> float:
    """Median seconds of one greedy batched generation of ``rows`` train prompts (the unit of an ES member's work)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_es.tasks import arithmetic_dataset

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    prompts = list(arithmetic_dataset("train", size=rows)["prompt"])
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first call warms up and is not counted
            start = time.perf_counter()
            model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


@dataclass
class RungStore:
    """The rung records (``RESULTS/rungs.json``) and where each rung's policy is built."""

    results: Path
    cache: Path
    # rung -> its policy folder (built if needed); the default builds ``build_policy --size RUNG``
    build: Callable[[str, Path], Path] | None = None
    records: dict = field(default_factory=dict)

    def __post_init__(self):
        path = self.results / "rungs.json"
        self.records = json.loads(path.read_text()) if path.exists() else {}
        self._folders: dict[str, Path] = {}
        self._digests: dict[str, str] = {}  # rung -> weights_sha256 of the folder built this session

    def save(self) -> None:
        self.results.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.results / "rungs.json", self.records)

    def known_mismatch(self, rung: str, kind: dict | None = None) -> dict | None:
        """The last recorded rebuild of ``rung`` on machine kind ``kind`` (default: this one) that gave other
        weights, or None."""
        kind = machine_kind() if kind is None else kind
        entries = self.records.get(rung, {}).get("rebuild_mismatches", [])
        return next((entry for entry in reversed(entries) if entry["machine"] == kind), None)

    def folder(self, rung: str) -> Path:
        """The rung's policy, built if needed, with the hash its recorded units ran on (else a named error).

        A rebuild that comes out with other weights is recorded with the machine kind it ran on (CPU model, SIMD
        level, torch, threads: float results differ between them), and that kind is refused up front later, before
        spending the build's time again (an hour at 14M on the 2-core machine)."""
        if rung not in self._folders:
            record, kind = self.records.get(rung, {}), machine_kind()
            recorded = record.get("weights_sha256")
            known = self.known_mismatch(rung, kind)
            if known:
                other = (known.get("weights_sha256") or "?")[:12]  # None: a rebuild stopped once it had diverged
                raise RuntimeError(
                    f"rung {rung}: a rebuild on this machine kind ({describe_machine(kind)}) gave weights "
                    f"{other}... on {known['date']}, not the {recorded[:12]}... this "
                    f"rung's units ran on ({self.results / 'rungs.json'}); not building it again to the same "
                    "result. Run this rung's units on another machine kind, or start a new ladder (another results "
                    "folder)."
                )
            folder = Path((self.build or build_policy)(rung, self.cache))
            digest = weights_sha256(folder)
            if recorded is not None and recorded != digest:
                mismatch = {"machine": kind, "weights_sha256": digest, "date": time.strftime("%Y-%m-%d %H:%M")}
                record.setdefault("rebuild_mismatches", []).append(mismatch)
                self.save()
                raise RuntimeError(
                    f"rung {rung}: the policy built in {folder} has weights {digest[:12]}..., but this rung's units "
                    f"ran on {recorded[:12]}... ({self.results / 'rungs.json'}); the rebuild is not bit-identical "
                    f"here ({describe_machine(kind)}), so new units would not be comparable. Rebuild on the machine "
                    "kind the units ran on, or start a new ladder (another results folder). This machine kind is "
                    "now recorded in rungs.json and refused up front next time."
                )
            self._folders[rung], self._digests[rung] = folder, digest
        return self._folders[rung]

    def prepare(self, rung: str, ladder: Ladder) -> dict:
        """The rung's record: built policy, hash, generation cost and budget (measured and saved the first time)."""
        record = self.records.get(rung)
        if record is not None:
            if record["ladder"] != ladder.fingerprint():
                raise RuntimeError(
                    f"rung {rung} was recorded with ladder settings {record['ladder']}, not {ladder.fingerprint()}: "
                    "a unit under other settings would not be comparable; use another results folder"
                )
            self.folder(rung)  # builds it and checks the hash
            return record
        folder = self.folder(rung)
        smallest = ladder.rungs[0]
        reference = generation_seconds(self.folder(smallest))
        cost = 1.0 if rung == smallest else generation_seconds(folder) / reference
        budget_seconds = round(ladder.base_seconds * max(cost, 1.0))
        if budget_seconds > ladder.max_unit_seconds:
            raise RuntimeError(
                f"rung {rung}: its wall-clock budget would be {budget_seconds} s (generation cost x{cost:.2f} the "
                f"smallest rung's), beyond max_unit_seconds={ladder.max_unit_seconds:g}: a unit would not fit a "
                "session; lower base_seconds for every rung or drop the rung"
            )
        info_path = folder / "build_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        record = {
            "rung": rung,
            "parameters": parameter_count(folder),
            "start_accuracy_at_build": info.get("heldout_500_accuracy"),
            "weights_sha256": self._digests[rung],
            "generation_cost_vs_smallest": round(cost, 3),
            "generation_seconds_smallest": round(reference, 4),
            "budget_rollouts": ladder.budget_rollouts,
            "budget_seconds": budget_seconds,
            "ladder": ladder.fingerprint(),
            "measured_at_load_average": load_average(),
            "built_on": machine_kind(),
            "build": {key: info.get(key) for key in ("size", "seed", "steps", "train_seconds", "command")},
        }
        self.records[rung] = record
        self.save()
        return record


def build_policy(rung: str, cache: Path) -> Path:
    """The shipped policy for the smallest size; other sizes built once per machine by ``build_policy --size``."""
    from trl_es.tasks import ARITHMETIC_POLICY_DIR

    if rung == "0.6M":
        return ARITHMETIC_POLICY_DIR
    folder = cache / f"arithmetic-policy-{rung}"
    if not (folder / "build_info.json").exists():
        command = [sys.executable, "-m", "benchmarks.build_policy", "--size", rung, "--output_dir", str(folder)]
        cache.mkdir(parents=True, exist_ok=True)
        print("building:", " ".join(command), flush=True)
        with open(cache / f"build_{rung}.log", "w") as log:
            # from the checkout's root, where ``benchmarks`` is importable
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    return folder


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def unit_command(unit: Unit, ladder: Ladder, record: dict, policy: Path, output: Path) -> list[str]:
    arm, own = ladder.compare_arm(unit)
    return [
        sys.executable, "-m", "trl_es.cli", "compare", "--config", ladder.recipe, "--output_dir", str(output),
        "--seeds", "1", "--arms", arm, "--seed", str(unit.seed), "--model_name_or_path", str(policy),
        "--compare.budget_rollouts", str(record["budget_rollouts"]),
        "--compare.budget_seconds", str(record["budget_seconds"]),
        "--compare.eval_points", str(ladder.eval_points), *ladder.extra_overrides, *own,
    ]  # fmt: skip


def run_unit(unit: Unit, ladder: Ladder, store: RungStore, work: Path, deadline: float) -> str:
    """Run one unit to its end and write its result file; returns "finished", "failed" or "discarded" (stopped at
    the deadline: its process group is killed and its work folder deleted, so nothing partial remains)."""
    record = store.prepare(unit.rung, ladder)
    output = work / unit.rung / f"{unit.arm}_seed{unit.seed}"
    shutil.rmtree(output, ignore_errors=True)  # a folder left by an earlier, stopped attempt
    output.mkdir(parents=True)
    command = unit_command(unit, ladder, record, store.folder(unit.rung), output)
    print(
        f"== unit {unit.name}: budget {record['budget_rollouts']:,} rollouts / {record['budget_seconds']} s",
        flush=True,
    )
    start_load = wait_until_quiet()  # the previous unit's own load must not mark this one busy
    started = time.time()
    with open(output / "unit.log", "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        while process.poll() is None:
            if time.time() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                shutil.rmtree(output, ignore_errors=True)
                print(f"!! unit {unit.name} reached the time limit after {time.time() - started:.0f} s: discarded")
                return "discarded"
            time.sleep(1.0)
    report_path = output / "compare.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    arm, _ = ladder.compare_arm(unit)
    runs = report.get("arms", {}).get(arm, {}).get("runs", [])
    if process.returncode != 0 or len(runs) != 1:
        tail = (output / "unit.log").read_text().strip().splitlines()[-5:]
        print(f"!! unit {unit.name} failed (exit code {process.returncode}); log {output / 'unit.log'}:", flush=True)
        print("\n".join(tail), flush=True)
        return "failed"
    result = {
        "unit": asdict(unit),
        "rung": {key: record[key] for key in ("parameters", "weights_sha256", "budget_rollouts", "budget_seconds")},
        "ladder": ladder.fingerprint(),
        "run": runs[0],
        "settings": report["arms"][arm]["settings"],
        # the CPU kind too: wall-clock budgets and step times compare only within one kind
        "machine": {**report["machine"], "load_average_before_unit": start_load, "kind": machine_kind()},
        "duration_s": round(time.time() - started, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit(),
        "command": [Path(command[0]).name, *command[1:]],
    }
    write_json_atomic(unit.result_path(store.results), result)
    print(f"== unit {unit.name} finished in {result['duration_s']:.0f} s: final held-out accuracy "
          f"{runs[0]['final_eval_accuracy']:.3f}", flush=True)  # fmt: skip
    return "finished"


def estimate_seconds(unit: Unit, ladder: Ladder, store: RungStore) -> float:
    """Upper estimate of the duration of a unit of a prepared rung: the rung's time budget plus the largest overhead
    (loading, evaluation) seen on a finished unit of the same rung and arm (else half the budget plus two minutes, a
    guess)."""
    budget = store.records[unit.rung]["budget_seconds"]
    overheads = []
    for path in (store.results / unit.rung).glob(f"{unit.arm}_seed*.json"):
        done = json.loads(path.read_text())
        overheads.append(done["duration_s"] - done["run"]["train_seconds"])
    return budget + (max(overheads) * 1.2 if overheads else budget / 2 + 120)


def resume(
    ladder: Ladder, store: RungStore, work: Path, max_minutes: float, selected=None, on_finished=None
) -> dict[str, list]:
    """Run the unfinished units (those ``selected(unit)`` accepts, default all) in order until ``max_minutes`` have
    passed. A unit that would not fit the time left (by :func:`estimate_seconds`) is skipped for a later one that
    might; one that still overruns is discarded. ``on_finished()`` runs after every finished unit."""
    deadline = time.time() + max_minutes * 60
    outcome = {"finished": [], "failed": [], "discarded": [], "skipped_for_time": [], "already_done": []}
    for unit in units(ladder):
        if selected is not None and not selected(unit):
            continue
        if unit.result_path(store.results).exists():
            outcome["already_done"].append(unit.name)
            continue
        if time.time() >= deadline:
            outcome["skipped_for_time"].append(unit.name)
            continue
        try:
            store.prepare(unit.rung, ladder)  # builds the policy and fixes the budget the first time a rung runs
        except RuntimeError as error:
            print(f"!! unit {unit.name}: {error}", flush=True)
            outcome["failed"].append(unit.name)
            continue
        if time.time() + estimate_seconds(unit, ladder, store) > deadline:
            outcome["skipped_for_time"].append(unit.name)
            continue
        status = run_unit(unit, ladder, store, work, deadline)
        outcome[status].append(unit.name)
        if status == "finished" and on_finished is not None:
            on_finished()
    return outcome
