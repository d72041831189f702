"""benchmarks/smollm2_compare.py: the selection's units carry their settings and budgets, the best point per arm is
chosen on validation accuracy, and the measurement runs ES and GRPO at the chosen points."""

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks.ladder import unit_command, units


ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("smollm2_compare", ROOT / "benchmarks" / "smollm2_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record():
    return {"budget_rollouts": 24_576, "budget_seconds": 2400}


def test_selection_units_carry_their_setting_and_their_arms_step_budget(tmp_path):
    bench = _module()
    ladder = bench.select_ladder()
    names = [unit.name for unit in units(ladder)]
    assert names[:2] == ["135M/es_seed42", "135M/grpo_seed42"] and len(names) == len(bench.SELECT_POINTS)
    commands = {u.arm: unit_command(u, ladder, _record(), tmp_path, tmp_path / u.arm) for u in units(ladder)}
    for arm, command in commands.items():
        # the arm's own budget comes after the ladder's, so it is the one the harness reads
        budget = [command[i + 1] for i, item in enumerate(command) if item == "--compare.budget_rollouts"]
        assert budget[-1] == ("12288" if bench.SELECT_POINTS[arm][0] == "es" else "1280")
    assert commands["es_sigma5e-3"][-4:-2] == ["--sigma", "0.005"]
    assert (
        "--arms" in commands["grpo_t0.7"]
        and commands["grpo_t0.7"][commands["grpo_t0.7"].index("--arms") + 1] == "grpo"
    )


def test_best_validation_point_per_arm_is_selected_and_measured(tmp_path):
    bench = _module()
    results = tmp_path / "select"
    assert bench.selected(results) is None  # nothing finished yet
    scores = {name: 0.2 for name in bench.SELECT_POINTS}
    scores.update({"es_sigma2e-3": 0.31, "grpo": 0.45})
    for name, score in scores.items():
        path = results / "135M" / f"{name}_seed42.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        run = {"final_validation_accuracy": score, "stopped_by": "rollouts"}
        path.write_text(json.dumps({"unit": {"rung": "135M", "arm": name, "seed": 42}, "run": run}))
    choice = bench.selected(results)
    assert choice["es"] == {"point": "es_sigma2e-3", "overrides": ["--sigma", "0.002"], "validation_accuracy": 0.31}
    assert choice["grpo"] == {"point": "grpo", "overrides": [], "validation_accuracy": 0.45}
    measure = bench.measure_ladder(choice)
    assert [u.name for u in units(measure)] == [f"135M/{arm}_seed{s}" for s in (42, 43, 44) for arm in ("grpo", "es")]
    es_unit = next(u for u in units(measure) if u.arm == "es")
    command = unit_command(es_unit, measure, _record(), tmp_path, tmp_path / "es")
    assert command[-2:] == ["--sigma", "0.002"] and command[command.index("--arms") + 1] == "es"


def test_a_selection_unit_stopped_by_the_time_cap_is_refused(tmp_path):
    bench = _module()
    for name in bench.SELECT_POINTS:
        path = tmp_path / "135M" / f"{name}_seed42.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        stopped_by = "budget_seconds" if name == "eggroll" else "rollouts"
        run = {"final_validation_accuracy": 0.3, "stopped_by": stopped_by}
        path.write_text(json.dumps({"unit": {"rung": "135M", "arm": name, "seed": 42}, "run": run}))
    with pytest.raises(RuntimeError, match=r"\['eggroll'\] stopped at the 2400 s cap"):
        bench.selected(tmp_path)
