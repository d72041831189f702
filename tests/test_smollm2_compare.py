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
    assert names[:2] == ["135M/es_seed42", "135M/grpo_seed42"] and len(names) == len(bench.phase_points("select"))
    essa_ladder = bench.select_ladder("select_essa")
    assert [u.arm for u in units(essa_ladder)] == ["essa_sigma0.05", "essa_sigma0.2", "essa_sigma0.5", "essa_sigma1.0"]
    commands = {
        u.arm: unit_command(u, phase, _record(), tmp_path, tmp_path / u.arm)
        for phase in (ladder, essa_ladder)
        for u in units(phase)
    }
    for arm, command in commands.items():
        # the arm's own budget comes after the ladder's, so it is the one the harness reads
        budget = [command[i + 1] for i, item in enumerate(command) if item == "--compare.budget_rollouts"]
        assert budget[-1] == ("1280" if bench.SELECT_POINTS[arm][0] == "grpo" else "12288")
    assert commands["es_sigma5e-3"][-4:-2] == ["--sigma", "0.005"]
    essa = commands["essa_sigma0.2"]  # ESSA runs as compare's ES arm over the shipped warm start
    assert essa[essa.index("--arms") + 1] == "es" and essa[-4:-2] == ["--cma_sigma0", "0.2"]
    assert essa[essa.index("--adapter_name_or_path") + 1] == "builtin:smollm2-chat-lora"
    assert (
        "--arms" in commands["grpo_t0.7"]
        and commands["grpo_t0.7"][commands["grpo_t0.7"].index("--arms") + 1] == "grpo"
    )


def _finish(results, scores, stopped_by="rollouts"):
    """Selection units with these validation scores, each in its phase's folder."""
    for name, score in scores.items():
        phase = "select_essa" if name.startswith("essa") else "select"
        path = results / phase / "135M" / f"{name}_seed42.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        run = {
            "final_validation_accuracy": score,
            "stopped_by": stopped_by(name) if callable(stopped_by) else stopped_by,
        }
        path.write_text(json.dumps({"unit": {"rung": "135M", "arm": name, "seed": 42}, "run": run}))


def test_best_validation_point_per_arm_is_selected_and_measured(tmp_path):
    bench = _module()
    results = tmp_path
    assert bench.selected(results) is None  # nothing finished yet
    scores = {name: 0.2 for name, (family, _) in bench.SELECT_POINTS.items() if family != "essa"}
    scores.update({"es_sigma2e-3": 0.31, "grpo": 0.45})
    _finish(results, scores)
    choice = bench.selected(results)  # ESSA's points have not run: ES and GRPO are measured without it
    assert list(choice) == ["es", "grpo"]
    assert choice["es"] == {"point": "es_sigma2e-3", "overrides": ["--sigma", "0.002"], "validation_accuracy": 0.31}
    assert choice["grpo"] == {"point": "grpo", "overrides": [], "validation_accuracy": 0.45}
    measure = bench.measure_ladder(choice)
    assert [u.name for u in units(measure)] == [f"135M/{arm}_seed{s}" for s in (42, 43, 44) for arm in ("grpo", "es")]
    assert bench.added_arms(measure) == ()
    es_unit = next(u for u in units(measure) if u.arm == "es")
    command = unit_command(es_unit, measure, _record(), tmp_path, tmp_path / "es")
    assert command[-2:] == ["--sigma", "0.002"] and command[command.index("--arms") + 1] == "es"


def test_essa_joins_the_measurement_once_its_points_finish_without_changing_es_or_grpo(tmp_path):
    bench = _module()
    results = tmp_path
    _finish(results, {name: 0.2 for name in bench.phase_points("select")})
    assert "essa" not in bench.selected(results)
    before = bench.measure_ladder(bench.selected(results))
    _finish(results, {"essa_sigma0.05": 0.5, "essa_sigma0.2": 0.4})
    assert "essa" not in bench.selected(results)  # not every ESSA point has finished: ESSA is not chosen yet
    _finish(results, {"essa_sigma0.5": 0.3, "essa_sigma1.0": 0.2})
    choice = bench.selected(results)
    assert choice["essa"]["point"] == "essa_sigma0.05" and choice["essa"]["validation_accuracy"] == 0.5
    measure = bench.measure_ladder(choice)
    assert measure.fingerprint() == before.fingerprint()  # the units ES and GRPO ran stay valid
    assert [arm.name for arm in bench.added_arms(measure)] == ["essa"]
    essa_units = [u for u in units(measure) if u.arm == "essa"]
    assert [u.seed for u in essa_units] == [42, 43, 44]
    command = unit_command(essa_units[0], measure, _record(), tmp_path, tmp_path / "essa")
    assert command[command.index("--arms") + 1] == "es" and command[-2:] == ["--cma_sigma0", "0.05"]
    assert "--strategy" in command and command[command.index("--strategy") + 1] == "cma"


def test_a_selection_unit_stopped_by_the_time_cap_is_refused(tmp_path):
    bench = _module()
    capped = {"eggroll", "essa_sigma0.2"}
    _finish(
        tmp_path,
        {name: 0.3 for name in bench.SELECT_POINTS},
        lambda n: "budget_seconds" if n in capped else "rollouts",
    )
    with pytest.raises(RuntimeError, match=r"\['eggroll', 'essa_sigma0.2'\] stopped at the 2400 s cap") as error:
        bench.selected(tmp_path)
    assert str(tmp_path / "select_essa" / "135M") in str(error.value)


def _unit(arm, seed, final, command_tail=(), kind=None):
    run = {
        "rollouts": [0, 1024, 2048],
        "wall_clock_s": [0.0, 400.0, 800.0],
        "eval_accuracy": [0.164, (0.164 + final) / 2, final],
        "final_eval_accuracy": final,
        "final_validation_accuracy": final + 0.05,
        "train_seconds": 800.0,
        "rollouts_total": 2048,
        "tokens_generated": 9000,
        "mean_step_s": 100.0,
        "steps": 12,
        "peak_rss_mb": 2800.0,
        "stopped_by": "wall_clock",
        "machine": {"busy": False},
    }
    return {
        "unit": {"rung": "135M", "arm": arm, "seed": seed},
        "rung": {"weights_sha256": "ab" * 32, "parameters": 134_515_008},
        "ladder": {"recipe": "smollm2_chat.yaml"},
        "run": run,
        "machine": {"kind": kind} if kind else {},
        "command": ["python", "--arms", "grpo" if arm.startswith("grpo") else "es", "--compare.eval_points", "4",
                    *command_tail],
    }  # fmt: skip


def test_report_pairs_es_and_grpo_seeds_and_reports_an_added_arm_apart(tmp_path):
    from benchmarks.smollm2_report import write_report

    bench = _module()
    kind = {"cpu": "Test CPU", "cpu_capability": "AVX2", "torch": "2.13.0+cpu", "threads": 2}
    record = {
        "parameters": 134_515_008, "weights_sha256": "ab" * 32, "budget_rollouts": 24_576, "budget_seconds": 1500,
        "generation_cost_vs_smallest": 1.0, "ladder": {"recipe": "smollm2_chat.yaml"},
    }  # fmt: skip
    measure = tmp_path / "measure"
    (measure / "135M").mkdir(parents=True)
    (measure / "rungs.json").write_text(json.dumps({"135M": record}))
    finished = [("es", 42, 0.41), ("grpo", 42, 0.63), ("es", 43, 0.39), ("grpo", 43, 0.61), ("es", 44, 0.40)]
    finished.append(("essa", 42, 0.45))
    for arm, seed, final in finished:
        path = measure / "135M" / f"{arm}_seed{seed}.json"
        path.write_text(json.dumps(_unit(arm, seed, final, kind=kind)))
    select = tmp_path / "select" / "135M"
    select.mkdir(parents=True)
    (select / "es_sigma1.2e-2_seed42.json").write_text(
        json.dumps(_unit("es_sigma1.2e-2", 42, 0.4, ["--sigma", "0.012", "--compare.budget_rollouts", "12288"]))
    )
    choice = {
        "es": {"point": "es_sigma1.2e-2", "overrides": ["--sigma", "0.012"], "validation_accuracy": 0.476},
        "grpo": {"point": "grpo_t0.7", "overrides": ["--grpo.temperature", "0.7"], "validation_accuracy": 0.678},
        "essa": {"point": "essa_sigma0.05", "overrides": ["--cma_sigma0", "0.05"], "validation_accuracy": 0.5},
    }
    essa = bench.DerivedArm("essa", "es", (("135M", ("--cma_sigma0", "0.05")),))
    report = write_report(tmp_path, "135M", choice, (essa,), {"select": "sigma 3e-3"})
    entry = report["comparison"]
    assert entry["seeds"] == [42, 43]  # es_seed44 has no GRPO partner yet
    assert entry["arms"]["es"]["final_accuracy"]["mean"] == pytest.approx(0.40)
    assert entry["es_minus_grpo_equal_rollouts"] == pytest.approx(0.40 - 0.62)
    assert entry["derived"]["essa"]["seeds"] == [42]
    text = (tmp_path / "smollm2.md").read_text()
    assert "Test CPU, AVX2, torch 2.13.0+cpu, 2 threads" in text
    assert "| ES (trl_es.ESTrainer) | --sigma 0.012 | 0.164 | 0.400 ± 0.010 |" in text
    assert "ES - GRPO -0.220" in text and "## essa against ES (seeds both finished: 42)" in text
    added = text[text.index("## essa against ES") :]  # the added arm beside ES and GRPO over its own seeds
    assert "| essa | --cma_sigma0 0.05 | 0.164 | 0.450 (one seed) | 12 | 100 | 2,048 | 800 | 2800 |" in added
    assert "| ES (trl_es.ESTrainer) | --sigma 0.012 | 0.164 | 0.410 (one seed) |" in added
    assert "| GRPO (trl.GRPOTrainer) | --grpo.temperature 0.7 | 0.164 | 0.630 (one seed) |" in added
    assert "ES final 0.410 (one seed), essa final 0.450 (one seed)" in added
    assert "{'es': [42, 43, 44], 'grpo': [42, 43]}" in text  # the unpaired unit is named, not dropped
    assert "| **es_sigma1.2e-2** | --sigma 0.012 | 12 | 0.450 | 0.400 | 100 |" in text
    assert json.loads((tmp_path / "smollm2.json").read_text())["selected"] == choice
    assert (tmp_path / "smollm2.png").stat().st_size > 0


def test_resume_runs_es_and_grpo_first_then_essas_selection_then_its_measurement(tmp_path, monkeypatch):
    bench = _module()
    _finish(tmp_path, {name: 0.2 for name in bench.phase_points("select")})
    calls = []

    def fake_resume(ladder, store, work, minutes, selected=None, on_finished=None):
        chosen = [u.arm for u in units(ladder) if selected is None or selected(u)]
        calls.append((work.name, sorted(set(chosen))))
        if work.name == "select_essa":  # ESSA's selection finishes during this pass
            _finish(
                tmp_path, {"essa_sigma0.05": 0.3, "essa_sigma0.2": 0.4, "essa_sigma0.5": 0.35, "essa_sigma1.0": 0.1}
            )
        return {"finished": [], "failed": []}

    monkeypatch.setattr(bench, "resume", fake_resume)
    stores = {phase: None for phase in (*bench.SELECT_PHASES, "measure")}
    assert bench.resume_all(tmp_path, tmp_path / "work", stores, max_minutes=60) is False
    assert calls == [
        ("measure", ["es", "grpo"]),
        ("select_essa", ["essa_sigma0.05", "essa_sigma0.2", "essa_sigma0.5", "essa_sigma1.0"]),
        ("measure", ["es", "essa", "grpo"]),
    ]
    assert json.loads((tmp_path / "selected.json").read_text())["essa"]["point"] == "essa_sigma0.2"
