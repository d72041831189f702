"""`trl-es compare`: recipe splitting, equal-budget accounting, the report schema, and a failing arm."""

import json
import pathlib

import pytest
import yaml

from trl_es.compare.plan import make_plan, rollouts_per_step
from trl_es.compare.report import accuracy_at, summarize
from trl_es.recipes import load_recipe, parse_overrides, train_config


QUICKSTART = pathlib.Path(__file__).parent.parent / "recipes" / "quickstart.yaml"


def test_quickstart_plan_gives_both_arms_the_same_budget():
    plan = make_plan(load_recipe(QUICKSTART))
    es, grpo = plan.arms["es"], plan.arms["grpo"]
    # shared: the task and the measurement
    assert plan.shared["model_name_or_path"] == "builtin:arithmetic-policy"
    assert plan.shared["max_completion_length"] == 4 and plan.shared["seed"] == 42
    # the top level is the ES arm; the grpo section is the GRPO arm (TRL defaults otherwise)
    assert es["population_size"] == 32 and es["optim"] == "sgd" and es["learning_rate"] == 4e-4
    assert grpo["learning_rate"] == 6e-4 and grpo["num_generations"] == 8 and "population_size" not in grpo
    assert "optim" not in grpo and "temperature" in grpo
    # 32 members x 128 distinct prompts per ES step; 256 completions per GRPO step
    assert rollouts_per_step("es", es) == 32 * 128 and rollouts_per_step("grpo", grpo) == 256
    assert plan.budget_rollouts == 307200 and plan.budget_seconds == 300
    assert es["max_steps"] == 75 and grpo["max_steps"] == 1200  # each LR schedule spans the same budget
    assert plan.eval_every_rollouts() == 30720


def test_train_reads_the_es_section_and_skips_the_comparison_sections():
    recipe = {"learning_rate": 1.0, "es": {"learning_rate": 2.0}, "grpo": {"learning_rate": 3.0}, "compare": {}}
    assert train_config(recipe) == {"learning_rate": 2.0}


def test_overrides_target_sections_and_bad_sections_are_named():
    recipe = load_recipe(QUICKSTART)
    plan = make_plan(recipe, parse_overrides(["--grpo.learning_rate", "1e-4", "--sigma", "0.02"]))
    assert plan.arms["grpo"]["learning_rate"] == 1e-4 and plan.arms["es"]["sigma"] == 0.02
    with pytest.raises(ValueError, match=r"grpo section: \['population_size'\] are ES fields"):
        make_plan({**recipe, "grpo": {"population_size": 4}})
    with pytest.raises(ValueError, match=r"compare section: unknown keys \['budget'\]"):
        make_plan({**recipe, "compare": {"budget": 3}})
    with pytest.raises(ValueError, match="budget_rollouts"):
        make_plan({key: value for key, value in recipe.items() if key not in ("max_steps", "compare")})
    with pytest.raises(ValueError, match="'--key value' pairs"):
        parse_overrides(["--sigma"])


def test_grid_is_centred_on_each_arms_learning_rate():
    plan = make_plan(load_recipe(QUICKSTART))
    assert plan.grids["es"] == pytest.approx([2e-4, 4e-4, 8e-4])
    assert plan.grids["grpo"] == pytest.approx([3e-4, 6e-4, 1.2e-3])


def _run(rollouts, seconds, accuracy, **scalars):
    return {"rollouts": rollouts, "wall_clock_s": seconds, "eval_accuracy": accuracy, **scalars}


def test_accuracy_at_takes_the_last_evaluation_at_or_before_the_point():
    run = _run([0, 10, 20], [0.0, 5.0, 9.0], [0.1, 0.2, 0.4])
    assert accuracy_at(run, "rollouts", 0) == 0.1
    assert accuracy_at(run, "rollouts", 19) == 0.2
    assert accuracy_at(run, "wall_clock_s", 100.0) == 0.4


def test_summary_compares_at_the_furthest_point_both_arms_reached():
    scalars = {"peak_rss_mb": 100.0, "mean_step_s": 1.0, "tokens_generated": 10, "train_seconds": 9.0}
    es = _run([0, 100, 200], [0.0, 4.0, 8.0], [0.3, 0.4, 0.5], final_eval_accuracy=0.5, rollouts_total=200, **scalars)
    grpo = _run([0, 50, 150], [0.0, 10.0, 30.0], [0.3, 0.6, 0.7], final_eval_accuracy=0.7, rollouts_total=150)
    grpo.update(scalars, peak_rss_mb=200.0)
    summary = summarize({"es": {"runs": [es]}, "grpo": {"runs": [grpo]}})
    assert summary["equal_rollouts"]["at"] == 150
    assert summary["equal_rollouts"]["es"]["mean"] == 0.4 and summary["equal_rollouts"]["grpo"]["mean"] == 0.7
    assert summary["equal_wall_clock_s"]["at"] == 8.0
    assert summary["equal_wall_clock_s"]["es"]["mean"] == 0.5 and summary["equal_wall_clock_s"]["grpo"]["mean"] == 0.3
    assert summary["peak_rss_es_over_grpo"] == 0.5


def _tiny_recipe(tmp_path, model_dir, grpo_extra=None):
    recipe = {
        "model_name_or_path": model_dir,
        "dataset_name": "builtin:arithmetic",
        "dataset_train_size": 64,
        "dataset_test_size": 12,
        "reward_funcs": ["arithmetic_accuracy"],
        "seed": 3,
        "max_completion_length": 3,
        "per_device_eval_batch_size": 12,
        "bf16": False,
        # ES arm: 4 members x (8 rows / 2 repeats, greedy) = 16 rollouts per step
        "population_size": 4,
        "sigma": 0.05,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 8,
        "num_generations": 2,
        "temperature": 0.0,
        # GRPO arm: 8 rows = 8 rollouts per step
        "grpo": {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "num_generations": 4, **(grpo_extra or {})},
        "compare": {"budget_rollouts": 64, "eval_points": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_compare_end_to_end_writes_the_report_with_equal_budgets(tiny_model_dir, tmp_path):
    from trl_es.compare.run import compare

    out = tmp_path / "out"
    compare(str(_tiny_recipe(tmp_path, tiny_model_dir)), str(out), seeds=1)
    report = json.loads((out / "compare.json").read_text())
    assert set(report) == {"arms", "budget", "config", "summary"}
    assert report["budget"]["rollouts"] == 64 and report["budget"]["seeds"] == [3]
    assert (out / "compare.md").read_text().count("|") > 10 and (out / "compare.png").stat().st_size > 0
    steps = {"es": 64 // 16, "grpo": 64 // 8}
    for name in ("es", "grpo"):
        arm = report["arms"][name]
        assert not arm["errors"], arm["errors"]
        (run,) = arm["runs"]
        assert run["seed"] == 3
        assert len(run["rollouts"]) == len(run["wall_clock_s"]) == len(run["eval_accuracy"]) >= 2
        # evaluated at the start, then on the rollout schedule; the budget is spent exactly (it divides both steps)
        assert run["rollouts"][0] == 0 and run["wall_clock_s"][0] == 0.0
        assert run["rollouts"][-1] == run["rollouts_total"] == 64
        assert run["steps"] == steps[name] and run["stopped_by"] == "rollouts"
        assert run["rollouts"] == sorted(run["rollouts"]) and run["wall_clock_s"] == sorted(run["wall_clock_s"])
        assert 0 < run["tokens_generated"] <= 64 * 3  # at most max_completion_length tokens per rollout
        assert run["peak_rss_mb"] > 100 and run["mean_step_s"] > 0
        assert run["final_eval_accuracy"] == run["eval_accuracy"][-1]
        assert all(0.0 <= a <= 1.0 for a in run["eval_accuracy"])
    # both arms start from the same base model and evaluate the same held-out prompts the same way
    assert report["arms"]["es"]["runs"][0]["eval_accuracy"][0] == report["arms"]["grpo"]["runs"][0]["eval_accuracy"][0]
    assert report["summary"]["equal_rollouts"]["at"] == 64


def test_a_failing_arm_is_reported_and_the_other_arm_is_still_written(tiny_model_dir, tmp_path):
    from trl_es.compare.run import main

    recipe = _tiny_recipe(tmp_path, tiny_model_dir, grpo_extra={"not_a_field": 1})
    out = tmp_path / "out"
    assert main(["--config", str(recipe), "--output_dir", str(out), "--compare.budget_rollouts", "16"]) == 1
    report = json.loads((out / "compare.json").read_text())
    assert report["arms"]["es"]["runs"] and not report["arms"]["grpo"]["runs"]
    (error,) = report["arms"]["grpo"]["errors"]
    assert "not_a_field" in error["error"]
    assert "failed" in (out / "compare.md").read_text()


def test_grid_reports_each_arms_best_learning_rate_by_mean_final_accuracy():
    from trl_es.compare.report import build_arm

    def runs(*finals):
        return [{"final_eval_accuracy": final} for final in finals]

    arm = build_arm({}, {1e-4: runs(0.4, 0.6), 3e-4: runs(0.55, 0.55), 1e-3: runs(0.9, 0.1)}, errors=[])
    assert arm["learning_rate"] == 3e-4 and arm["mean_final_eval_accuracy"] == 0.55
    assert [g["learning_rate"] for g in arm["grid"]] == [1e-4, 3e-4, 1e-3]
    assert build_arm({}, {}, errors=[{"error": "boom"}])["learning_rate"] is None
