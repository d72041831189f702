"""`trl-es compare`: recipe splitting, variants, equal-budget accounting per arm, validation-based selection, machine
load, the report schema, and a failing arm."""

import json
import pathlib

import pytest
from conftest import tiny_compare_recipe

from trl_es.compare.plan import make_plan, rollouts_per_step
from trl_es.compare.report import accuracy_at, markdown, summarize
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


@pytest.mark.parametrize(
    "compare_section, message",
    [
        ({"budget_rollouts": "lots"}, r"compare.budget_rollouts: expected an integer, got str 'lots'"),
        ({"budget_rollouts": 64, "budget_seconds": "soon"}, r"compare.budget_seconds: expected a number"),
        ({"budget_rollouts": 64, "eval_points": 2.5}, r"compare.eval_points: expected an integer, got float 2.5"),
        ({"budget_rollouts": 64, "arms": "es"}, r"compare.arms: expected a list"),
        ({"budget_rollouts": 64, "grid": [1e-3]}, r"compare.grid: expected a mapping"),
    ],
)
def test_compare_settings_of_the_wrong_type_are_named(compare_section, message):
    with pytest.raises(ValueError, match=message):
        make_plan({**load_recipe(QUICKSTART), "compare": compare_section})


def test_arm_settings_of_the_wrong_type_are_named_before_the_budget_is_split():
    recipe = load_recipe(QUICKSTART)
    with pytest.raises(ValueError, match=r"es arm: population_size: expected an integer, got str 'many'"):
        make_plan({**recipe, "population_size": "many"})
    with pytest.raises(ValueError, match=r"big arm: per_device_train_batch_size: expected an integer"):
        make_plan({**recipe, "variants": {"big": {"per_device_train_batch_size": "32"}}})
    with pytest.raises(ValueError, match=r"grpo arm: num_iterations: expected an integer"):
        make_plan({**recipe, "grpo": {**recipe["grpo"], "num_iterations": None}})


@pytest.mark.parametrize(
    "grpo_extra, extra, message",
    [
        ({"num_generations": 3}, {}, r"grpo arm: .*must be divisible by num_generations \(3\)"),
        ({}, dict(fitness_shaping="rank"), r"es arm: fitness_shaping='rank' is unknown"),
        ({"not_a_field": 1}, {}, r"grpo arm: .*not_a_field"),
        (
            {"vllm_dtype": "bfloat16"},
            {},
            r"grpo arm: vllm_dtype='bfloat16' is the dtype of a vLLM engine, but use_vllm",
        ),
        (
            {},
            dict(compare={"budget_rollouts": 64, "grid": {"es": {"population_size": [4, 5]}}, "validation_size": 8}),
            r"es arm at grid point population_size=5: population_size=5 is odd",
        ),
    ],
)
def test_every_arm_and_grid_point_is_checked_before_any_arm_runs(tiny_model_dir, tmp_path, grpo_extra, extra, message):
    from trl_es.compare.run import compare

    recipe = tiny_compare_recipe(tmp_path, tiny_model_dir, grpo_extra, **extra)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        compare(str(recipe), str(out), grid="grid" in extra.get("compare", {}))
    assert not (out / "runs").exists() and not (out / "compare.json").exists()  # nothing ran


def test_a_grpo_arm_keeps_its_vllm_dtype_for_its_engine():
    from trl import GRPOConfig

    from trl_es.compare.plan import parse_arm

    recipe = load_recipe(QUICKSTART)
    engine = {"use_vllm": True, "vllm_mode": "colocate"}
    for grpo, expected in (({**engine, "vllm_dtype": "bfloat16"}, "bfloat16"), (engine, None)):
        plan = make_plan({**recipe, "grpo": {**recipe["grpo"], **grpo}})
        _, args, _ = parse_arm("grpo", {**plan.shared, **plan.arms["grpo"], "output_dir": "unused"}, "grpo")
        assert type(args) is GRPOConfig and args.vllm_dtype == expected


def test_grid_is_centred_on_each_arms_learning_rate():
    plan = make_plan(load_recipe(QUICKSTART))
    assert [p["learning_rate"] for p in plan.grids["es"]] == pytest.approx([2e-4, 4e-4, 8e-4])
    assert [p["learning_rate"] for p in plan.grids["grpo"]] == pytest.approx([3e-4, 6e-4, 1.2e-3])


def test_grid_of_an_es_arm_without_a_learning_rate_is_centred_on_the_derived_one():
    recipe = load_recipe(QUICKSTART)
    del recipe["learning_rate"]  # ESConfig derives it from sigma 0.01: 1.73 sigma^2 for SGD with centered ranks
    plan = make_plan(recipe)
    derived = 0.01**2 / 2 * 12**0.5
    assert [p["learning_rate"] for p in plan.grids["es"]] == pytest.approx([derived / 2, derived, derived * 2])


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


def test_compare_end_to_end_writes_the_report_with_equal_budgets(tiny_model_dir, tmp_path):
    from trl_es.compare.run import compare

    out = tmp_path / "out"
    # a variant: the ES arm with 2 prompt groups, 4 members x 4 prompts / 2 = 8 rollouts per step
    recipe = tiny_compare_recipe(tmp_path, tiny_model_dir, variants={"grouped": {"prompt_groups": 2}})
    compare(str(recipe), str(out), seeds=1, overrides=["--compare.validation_size", "16"])
    report = json.loads((out / "compare.json").read_text())
    assert set(report) == {"arms", "budget", "config", "summary", "splits", "machine"}
    assert list(report["arms"]) == ["es", "grouped", "grpo"]
    assert report["budget"]["rollouts"] == 64 and report["budget"]["seeds"] == [3]
    assert report["budget"]["max_steps"] == {"es": 4, "grouped": 8, "grpo": 8}
    assert report["splits"] == {
        "reported_on": "test",
        "test_examples": 12,
        "selected_on": None,
        "validation_examples": 16,
        "selection": "no grid: each arm as configured",
    }
    machine = report["machine"]
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    assert machine["cores"] >= 1 and "cores - 0.5" in machine["busy_rule"] and isinstance(machine["busy"], bool)
    markdown_text = (out / "compare.md").read_text()
    assert markdown_text.count("|") > 10 and (out / "compare.png").stat().st_size > 0
    assert "ES variant `grouped`" in markdown_text and "prompt_groups=2" in markdown_text
    steps = {"es": 64 // 16, "grouped": 64 // 8, "grpo": 64 // 8}
    for name in ("es", "grouped", "grpo"):
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
        # the validation split is scored at the start and the end; the curve is the test split
        assert (
            len(run["validation_accuracy"]) == 2 and run["final_validation_accuracy"] == run["validation_accuracy"][1]
        )
        assert set(run["machine"]) >= {"load_average_before", "others_cpu_cores", "busy"}
        assert ("es/fitness_std" in run["es_metrics"]) == (name != "grpo")  # the trainer's diagnostics, averaged
        assert (out / "runs" / f"{name}_seed3" / "log_history.json").is_file()
    # both arms start from the same base model and evaluate the same held-out prompts the same way
    assert report["arms"]["es"]["runs"][0]["eval_accuracy"][0] == report["arms"]["grpo"]["runs"][0]["eval_accuracy"][0]
    assert report["summary"]["equal_rollouts"]["at"] == 64


def test_a_failing_arm_is_reported_and_the_other_arm_is_still_written(tiny_model_dir, tmp_path):
    from trl_es.compare.run import main

    # Valid settings that fail only when the arm runs (settings that cannot work are refused before any arm runs).
    missing = str(tmp_path / "no_such_adapter")
    recipe = tiny_compare_recipe(tmp_path, tiny_model_dir, grpo_extra={"adapter_name_or_path": missing})
    out = tmp_path / "out"
    assert main(["--config", str(recipe), "--output_dir", str(out), "--compare.budget_rollouts", "16"]) == 1
    report = json.loads((out / "compare.json").read_text())
    assert report["arms"]["es"]["runs"] and not report["arms"]["grpo"]["runs"]
    (error,) = report["arms"]["grpo"]["errors"]
    assert "no_such_adapter" in error["error"], error
    assert "failed" in (out / "compare.md").read_text()


def test_grid_chooses_each_arms_point_on_validation_never_on_test():
    from trl_es.compare.report import build_arm

    def runs(lr, *pairs):  # (validation, test) final accuracy of each seed
        return [{"learning_rate": lr, "final_validation_accuracy": v, "final_eval_accuracy": t} for v, t in pairs]

    points = {"a": {"learning_rate": 1e-4}, "b": {"learning_rate": 3e-4}, "c": {"learning_rate": 1e-3}}
    grid = {
        "a": runs(1e-4, (0.4, 0.95), (0.6, 0.95)),  # the best on test: must not matter
        "b": runs(3e-4, (0.55, 0.5), (0.55, 0.6)),
        "c": runs(1e-3, (0.9, 0.1), (0.1, 0.1)),
    }
    arm = build_arm({}, grid, errors=[], points=points)
    assert arm["selected"] == {"learning_rate": 3e-4} and arm["learning_rate"] == 3e-4
    assert arm["mean_final_eval_accuracy"] == 0.55 and arm["mean_final_validation_accuracy"] == 0.55
    assert [g["point"] for g in arm["grid"]] == list(points.values())
    assert [g["mean_final_validation_accuracy"] for g in arm["grid"]] == pytest.approx([0.5, 0.55, 0.5])
    assert build_arm({}, {}, errors=[{"error": "boom"}])["learning_rate"] is None
    without_validation = {key: [{**r, "final_validation_accuracy": None} for r in rs] for key, rs in grid.items()}
    with pytest.raises(ValueError, match="chosen on the validation split"):
        build_arm({}, without_validation, errors=[], points=points)


def test_variants_are_es_arms_over_the_es_settings_and_get_their_own_budget_steps():
    recipe = load_recipe(QUICKSTART)
    recipe["variants"] = {
        "many": {"perturbation": "low_rank", "population_size": 256, "prompt_groups": 8},
        "adam": {"optim": "adamw_torch", "learning_rate": 1e-4, "anchor_decay": 0.1},
        "essa": {"adapter_name_or_path": "builtin:arithmetic-lora", "perturbation": "svd", "strategy": "cma"},
    }
    plan = make_plan(
        recipe,
        parse_overrides(["--variants.many.sigma", "0.02", "--variants.probe.log_frac_changed_completions", "true"]),
    )
    assert list(plan.arms) == ["es", "many", "adam", "essa", "probe", "grpo"]
    assert set(plan.kinds.values()) == {"es", "grpo"} and plan.kinds["many"] == "es" and plan.kinds["grpo"] == "grpo"
    many, adam, essa, probe = (plan.arms[name] for name in ("many", "adam", "essa", "probe"))
    # a variant is the ES arm's settings plus its own
    assert many["sigma"] == 0.02 and many["num_generations"] == 2 and many["population_size"] == 256
    assert adam["population_size"] == 32 and adam["optim"] == "adamw_torch" and adam["anchor_decay"] == 0.1
    assert essa["adapter_name_or_path"] == "builtin:arithmetic-lora" and "adapter_name_or_path" not in plan.arms["es"]
    # budget accounting per arm: 256 members x 128 prompts / 8 groups = 32 x 128 per step; the diagnostic adds 128
    assert rollouts_per_step("es", many) == rollouts_per_step("es", plan.arms["es"]) == 4096
    assert rollouts_per_step("es", probe) == 4096 + 128
    assert many["max_steps"] == adam["max_steps"] == essa["max_steps"] == 75
    assert probe["max_steps"] == -(-307200 // (4096 + 128))
    # CMA-ES has no learning rate: its default grid is its step size
    assert [p["cma_sigma0"] for p in plan.grids["essa"]] == pytest.approx([0.05, 0.1, 0.2])
    assert plan.variants["many"] == {
        "perturbation": "low_rank",
        "population_size": 256,
        "prompt_groups": 8,
        "sigma": 0.02,
    }
    # --arms / compare.arms pick and order a subset
    assert list(make_plan(recipe, arms=["grpo", "many"]).arms) == ["grpo", "many"]
    with pytest.raises(ValueError, match=r"arms \['nope'\]: choose from"):
        make_plan(recipe, arms=["nope"])


def test_arm_sections_may_not_change_what_makes_arms_comparable():
    recipe = load_recipe(QUICKSTART)
    with pytest.raises(ValueError, match=r"variants.v: \['dataset_test_size', 'seed'\] are shared by every arm"):
        make_plan({**recipe, "variants": {"v": {"seed": 1, "dataset_test_size": 10}}})
    with pytest.raises(ValueError, match=r"grpo section: \['reward_funcs'\] are shared"):
        make_plan({**recipe, "grpo": {"reward_funcs": ["x"]}})
    with pytest.raises(ValueError, match="not a usable arm name"):
        make_plan({**recipe, "variants": {"grpo": {}}})
    with pytest.raises(ValueError, match="--variants.NAME.KEY VALUE"):
        make_plan(recipe, {"variants.sigma": 0.1})
    with pytest.raises(ValueError, match="prompt_groups=3 does not divide the 128 prompt rows"):
        make_plan({**recipe, "variants": {"v": {"prompt_groups": 3}}})
    with pytest.raises(ValueError, match=r"compare.grid: no arm named \['ghost'\]"):
        make_plan({**recipe, "compare": {**recipe["compare"], "grid": {"ghost": [1e-3]}}})
    # the GRPO arm may load the same warm-start adapter as an ESSA variant
    plan = make_plan({**recipe, "grpo": {**recipe["grpo"], "adapter_name_or_path": "builtin:arithmetic-lora"}})
    assert plan.arms["grpo"]["adapter_name_or_path"] == "builtin:arithmetic-lora"


def test_validation_size_is_shared_by_every_arm_and_grid_mappings_expand():
    recipe = load_recipe(QUICKSTART)
    compare_section = {
        **recipe["compare"],
        "validation_size": 500,
        "grid": {"es": {"learning_rate": [1e-4, 2e-4], "sigma": [0.01, 0.02]}},
    }
    plan = make_plan({**recipe, "compare": compare_section})
    assert plan.shared["dataset_validation_size"] == 500 and plan.validation_size == 500
    assert plan.grids["es"] == [
        {"learning_rate": 1e-4, "sigma": 0.01},
        {"learning_rate": 1e-4, "sigma": 0.02},
        {"learning_rate": 2e-4, "sigma": 0.01},
        {"learning_rate": 2e-4, "sigma": 0.02},
    ]
    with pytest.raises(ValueError, match="validation_size must be a number of rows"):
        make_plan({**recipe, "compare": {**recipe["compare"], "validation_size": 0}})


def test_waiting_for_a_quiet_machine_stops_at_the_start_rule_or_the_timeout(monkeypatch):
    from trl_es.compare import machine

    loads = iter([[1.9, 1.8, 1.7], [1.6, 1.7, 1.7], [1.4, 1.6, 1.7], [0.1, 0.1, 0.1]])
    monkeypatch.setattr(machine, "cores", lambda: 2)
    monkeypatch.setattr(machine, "load_average", lambda: next(loads))
    monkeypatch.setattr(machine.time, "sleep", lambda seconds: None)
    assert machine.wait_until_quiet(timeout_s=60, poll_s=5) == [1.4, 1.6, 1.7]  # first at or below 2 - 0.5
    monkeypatch.setattr(machine, "load_average", lambda: [3.0, 3.0, 3.0])
    assert machine.wait_until_quiet(timeout_s=0.0) == [3.0, 3.0, 3.0]  # a busy machine is waited for, not forever
    monkeypatch.setattr(machine, "load_average", lambda: None)  # not Linux: nothing to wait for
    assert machine.wait_until_quiet(timeout_s=60) is None


def test_the_report_flags_a_busy_machine_with_its_rule():
    from trl_es.compare.machine import BUSY_RULE, CpuWindow, machine_record

    window = CpuWindow().start()
    sum(i * i for i in range(200_000))  # our own CPU time is not "other processes"
    record = window.stop()
    assert record["cores"] >= 1 and (record["others_cpu_cores"] is None or record["others_cpu_cores"] >= 0)
    quiet = machine_record([0.1, 0.1, 0.1], [{"label": "es_seed1", "machine": {"busy": False}}])
    assert not quiet["busy"] and quiet["busy_rule"] == BUSY_RULE and len(quiet["load_average_end"]) == 3
    busy = machine_record([0.1, 0.1, 0.1], [{"label": "es_seed1", "machine": {"busy": True}}])
    assert busy["busy"] and busy["busy_runs"] == ["es_seed1"]
    assert machine_record([99.0, 1.0, 1.0], [])["busy_at_start"]
    run = _run([0, 10], [0.0, 1.0], [0.1, 0.2], final_eval_accuracy=0.2, rollouts_total=10, peak_rss_mb=1.0)
    run.update(mean_step_s=1.0, tokens_generated=1, train_seconds=1.0, machine={"busy": True})
    report = {
        "arms": {"es": {"kind": "es", "settings": {}, "selected": {}, "learning_rate": 1e-3, "runs": [run]}},
        "budget": {"seeds": [1], "rollouts": 10},
        "config": {},
        "machine": busy,
    }
    report["summary"] = summarize(report["arms"])
    text = markdown(report)
    assert "**Busy machine**" in text and "es_seed1" in text and "(1 busy)" in text


def test_grid_runs_every_point_and_reports_the_one_validation_chose(tiny_model_dir, tmp_path):
    from trl_es.compare.run import main

    recipe = tiny_compare_recipe(tmp_path, tiny_model_dir, grpo_extra={})
    out = tmp_path / "out"
    argv = ["--config", str(recipe), "--output_dir", str(out), "--grid", "--arms", "es"]
    with pytest.raises(ValueError, match="--grid chooses each arm's settings on a validation split"):
        main(argv)
    assert main(argv + ["--compare.validation_size", "16", "--compare.grid", "{es: [1.0e-3, 1.0e-2]}"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert list(report["arms"]) == ["es"] and report["splits"]["selected_on"] == "validation"
    arm = report["arms"]["es"]
    by_point = {g["point"]["learning_rate"]: g["mean_final_validation_accuracy"] for g in arm["grid"]}
    assert set(by_point) == {1e-3, 1e-2}
    assert arm["selected"]["learning_rate"] == max(by_point, key=by_point.get)  # ties: the first point
    (run,) = arm["runs"]
    assert run["grid_point"] == arm["selected"] and run["learning_rate"] == arm["selected"]["learning_rate"]


def test_the_variants_recipe_plans_five_arms_on_one_budget_and_every_arm_type_checks():
    from trl import GRPOConfig, ModelConfig

    from trl_es import ESConfig
    from trl_es.recipe_checks import check_recipe_types
    from trl_es.recipes import ESScriptArguments

    plan = make_plan(load_recipe(QUICKSTART.with_name("compare_variants.yaml")))
    assert list(plan.arms) == ["es", "many", "adam", "essa", "grpo"] and plan.validation_size == 500
    for name, config in plan.arms.items():
        kind = plan.kinds[name]
        classes = (ESScriptArguments, ESConfig if kind == "es" else GRPOConfig, ModelConfig)
        assert check_recipe_types({**plan.shared, **config}, classes) == [], name
        assert config["max_steps"] == (1200 if kind == "grpo" else 75), name  # 4,096 rollouts per ES-family step


def test_seed_on_the_command_line_is_a_recipe_override_not_an_abbreviation_of_seeds():
    from trl_es.compare.run import _parse

    args, overrides = _parse(["--config", "r.yaml", "--output_dir", "o", "--seeds", "1", "--seed", "43"])
    assert args.seeds == 1 and parse_overrides(overrides) == {"seed": 43}
