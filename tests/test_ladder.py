"""The scale ladder as units: a unit's result file appears only when it finished, resume skips finished units,
a unit stopped at the deadline leaves nothing, the rung's policy hash guards against mixing rebuilds, and the
aggregate pairs seeds across arms."""

import json
import shutil
import time

import pytest
from conftest import tiny_compare_recipe

from benchmarks.ladder import (
    DerivedArm,
    Ladder,
    RungStore,
    Unit,
    resume,
    run_unit,
    unit_command,
    units,
    weights_sha256,
)
from benchmarks.ladder_aggregate import aggregate, markdown, plot, write_aggregate
from trl_es.compare.machine import machine_kind


@pytest.fixture(autouse=True)
def no_waiting_for_a_quiet_machine(monkeypatch):
    """Units here run beside the rest of the suite: the wait before a unit starts (tested in test_compare) would
    add minutes."""
    import benchmarks.ladder

    monkeypatch.setattr(benchmarks.ladder, "wait_until_quiet", lambda: [0.0, 0.0, 0.0])


def _recipe(tmp_path, model_dir):
    return str(tiny_compare_recipe(tmp_path, model_dir, compare={"budget_rollouts": 32, "eval_points": 2}))


def _store(tmp_path, folders):
    return RungStore(results=tmp_path / "results", cache=tmp_path / "cache", build=lambda rung, cache: folders[rung])


def test_units_run_rung_by_rung_with_both_arms_of_a_seed_together():
    ladder = Ladder(recipe="r.yaml", budget_rollouts=1, base_seconds=1, rungs=("a", "b"), seeds=(1, 2))
    assert [u.name for u in units(ladder)][:5] == [
        "a/es_seed1",
        "a/grpo_seed1",
        "a/es_seed2",
        "a/grpo_seed2",
        "b/es_seed1",
    ]


def test_resume_runs_units_once_and_the_aggregate_pairs_them(tiny_model_dir, tmp_path):
    ladder = Ladder(recipe=_recipe(tmp_path, tiny_model_dir), budget_rollouts=32, base_seconds=600, eval_points=2,
                    rungs=("small",), seeds=(3,))  # fmt: skip
    store = _store(tmp_path, {"small": tiny_model_dir})
    finished = []
    outcome = resume(ladder, store, tmp_path / "work", max_minutes=20, on_finished=lambda: finished.append(1))
    assert outcome["finished"] == ["small/es_seed3", "small/grpo_seed3"] and len(finished) == 2
    assert not outcome["failed"] and not outcome["discarded"]
    record = json.loads((tmp_path / "results" / "rungs.json").read_text())["small"]
    assert record["weights_sha256"] == weights_sha256(tiny_model_dir)
    assert record["budget_seconds"] == 600 and record["generation_cost_vs_smallest"] == 1.0
    for arm in ("es", "grpo"):
        done = json.loads((tmp_path / "results" / "small" / f"{arm}_seed3.json").read_text())
        assert done["unit"] == {"rung": "small", "arm": arm, "seed": 3}
        assert (
            done["run"]["seed"] == 3
            and done["run"]["rollouts_total"] == 32
            and done["run"]["stopped_by"] == "rollouts"
        )
        assert done["rung"]["weights_sha256"] == record["weights_sha256"] and done["duration_s"] > 0
        assert "--arms" in done["command"] and set(done["machine"]) >= {"busy_rule", "load_average_before_unit"}
        assert done["machine"]["kind"] == machine_kind()  # wall-clock compares only within one CPU kind
    # a second pass finds nothing to do
    again = resume(ladder, store, tmp_path / "work", max_minutes=20)
    assert again["already_done"] == ["small/es_seed3", "small/grpo_seed3"] and not again["finished"]

    (entry,) = write_aggregate(tmp_path / "results", tmp_path / "scale_ladder.json")
    assert entry["seeds"] == [3] and entry["units"] == {"es": [3], "grpo": [3]}
    es_runs = json.loads((tmp_path / "results" / "small" / "es_seed3.json").read_text())["run"]
    assert entry["arms"]["es"]["final_accuracy"]["mean"] == es_runs["final_eval_accuracy"]
    assert entry["equal_rollouts"]["at"] == 32
    assert entry["es_minus_grpo_equal_rollouts"] == pytest.approx(
        entry["equal_rollouts"]["es"]["mean"] - entry["equal_rollouts"]["grpo"]["mean"]
    )
    written = json.loads((tmp_path / "scale_ladder.json").read_text())
    assert written["rungs"][0]["rung"] == "small" and "| small |" in (tmp_path / "scale_ladder.md").read_text()
    assert (tmp_path / "scale_ladder.png").stat().st_size > 0


def test_a_unit_stopped_at_the_deadline_leaves_nothing(tiny_model_dir, tmp_path):
    ladder = Ladder(recipe=_recipe(tmp_path, tiny_model_dir), budget_rollouts=32, base_seconds=600, rungs=("small",))
    store = _store(tmp_path, {"small": tiny_model_dir})
    store.prepare("small", ladder)
    unit = Unit("small", "es", 42)
    assert run_unit(unit, ladder, store, tmp_path / "work", deadline=time.time() + 2) == "discarded"
    assert not unit.result_path(store.results).exists() and not (tmp_path / "work" / "small" / "es_seed42").exists()
    # resume does not start a unit whose estimated duration does not fit the minutes left
    outcome = resume(ladder, store, tmp_path / "work", max_minutes=1)
    assert outcome["skipped_for_time"] == [u.name for u in units(ladder)] and not outcome["finished"]


def test_a_rebuilt_policy_with_other_weights_is_refused(tiny_model, tiny_model_dir, tmp_path):
    recipe = _recipe(tmp_path, tiny_model_dir)
    ladder = Ladder(recipe=recipe, budget_rollouts=32, base_seconds=600, rungs=("small",))
    store = _store(tmp_path, {"small": tiny_model_dir})
    store.prepare("small", ladder)
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(tiny_model_dir, rebuilt)
    tiny_model.model.embed_tokens.weight.data[0, 0] += 1.0
    tiny_model.save_pretrained(rebuilt)
    assert store.records["small"]["built_on"] == machine_kind()
    fresh = _store(tmp_path, {"small": rebuilt})  # a later session: rungs.json is read back
    with pytest.raises(RuntimeError, match=r"rung small: the policy built in .* not bit-identical"):
        fresh.prepare("small", ladder)
    # the mismatch is recorded with this machine kind, which a later session then refuses before building again
    (mismatch,) = json.loads((tmp_path / "results" / "rungs.json").read_text())["small"]["rebuild_mismatches"]
    assert mismatch["machine"] == machine_kind() and mismatch["weights_sha256"] == weights_sha256(rebuilt)
    builds = []
    later = RungStore(tmp_path / "results", tmp_path / "cache", build=lambda rung, cache: builds.append(rung))
    with pytest.raises(RuntimeError, match=r"a rebuild on this machine kind \(.*\) gave weights .* not building it"):
        later.prepare("small", ladder)
    assert builds == []
    # a rebuild stopped by hand once it had diverged is recorded without a hash, and refused the same way
    path = tmp_path / "results" / "rungs.json"
    records = json.loads(path.read_text())
    records["small"]["rebuild_mismatches"][0]["weights_sha256"] = None
    path.write_text(json.dumps(records))
    stopped = RungStore(tmp_path / "results", tmp_path / "cache", build=lambda rung, cache: builds.append(rung))
    with pytest.raises(RuntimeError, match=r"gave weights \?\.\.\. on"):
        stopped.prepare("small", ladder)
    assert builds == []
    other_settings = Ladder(recipe=recipe, budget_rollouts=64, base_seconds=600, rungs=("small",))
    with pytest.raises(RuntimeError, match="recorded with ladder settings"):
        _store(tmp_path, {"small": tiny_model_dir}).prepare("small", other_settings)
    # the recipe is part of the experiment by its values, wherever the checkout is
    moved = tmp_path / "elsewhere" / "recipe.yaml"
    moved.parent.mkdir()
    shutil.copy(recipe, moved)
    assert Ladder(recipe=str(moved), budget_rollouts=32, base_seconds=600).fingerprint() == ladder.fingerprint()
    moved.write_text(moved.read_text().replace("sigma: 0.05", "sigma: 0.1"))
    assert Ladder(recipe=str(moved), budget_rollouts=32, base_seconds=600).fingerprint() != ladder.fingerprint()


def test_a_rung_whose_budget_would_not_fit_a_session_is_refused(tiny_model_dir, tmp_path):
    ladder = Ladder(recipe=_recipe(tmp_path, tiny_model_dir), budget_rollouts=32, base_seconds=3600, rungs=("small",))
    with pytest.raises(RuntimeError, match="beyond max_unit_seconds"):
        _store(tmp_path, {"small": tiny_model_dir}).prepare("small", ladder)


def _unit_file(results, rung, arm, seed, curve, digest="h", ladder=None):
    rollouts, seconds, accuracy = curve
    run = {
        "seed": seed, "rollouts": rollouts, "wall_clock_s": seconds, "eval_accuracy": accuracy,
        "final_eval_accuracy": accuracy[-1], "rollouts_total": rollouts[-1], "train_seconds": seconds[-1],
        "peak_rss_mb": 100.0, "mean_step_s": 1.0, "tokens_generated": 1, "stopped_by": "rollouts",
        "machine": {"busy": arm == "grpo" and seed == 2},
    }  # fmt: skip
    data = {"unit": {"rung": rung, "arm": arm, "seed": seed}, "rung": {"weights_sha256": digest}, "run": run,
            "ladder": ladder or {"budget_rollouts": 10}}  # fmt: skip
    path = results / rung / f"{arm}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_aggregate_uses_the_seeds_every_arm_finished(tmp_path):
    results = tmp_path / "results"
    record = {"parameters": 1000, "weights_sha256": "h", "budget_rollouts": 10, "budget_seconds": 5,
              "generation_cost_vs_smallest": 1.0, "ladder": {"budget_rollouts": 10}}  # fmt: skip
    results.mkdir()
    (results / "rungs.json").write_text(json.dumps({"a": {**record}, "b": {**record, "parameters": 20000}}))
    _unit_file(results, "a", "es", 1, ([0, 10], [0.0, 2.0], [0.3, 0.5]))
    _unit_file(results, "a", "grpo", 1, ([0, 5, 10], [0.0, 2.0, 5.0], [0.3, 0.6, 0.9]))
    _unit_file(results, "a", "es", 2, ([0, 10], [0.0, 2.0], [0.3, 0.4]))
    _unit_file(results, "a", "grpo", 2, ([0, 5, 10], [0.0, 2.0, 5.0], [0.3, 0.7, 0.8]))
    _unit_file(results, "a", "es", 3, ([0, 10], [0.0, 2.0], [0.3, 0.9]))  # no GRPO seed 3 yet: left out
    _unit_file(results, "b", "es", 1, ([0, 10], [0.0, 4.0], [0.2, 0.5]))  # rung b has no GRPO unit at all
    a, b = aggregate(results, ("a", "b"))
    assert a["seeds"] == [1, 2] and a["units"] == {"es": [1, 2, 3], "grpo": [1, 2]}
    # equal rollouts at 10: ES 0.5 / 0.4, GRPO 0.9 / 0.8; equal wall-clock at 2 s: GRPO 0.6 / 0.7
    assert a["es_minus_grpo_equal_rollouts"] == pytest.approx(0.45 - 0.85)
    assert a["es_minus_grpo_equal_wall_clock"] == pytest.approx(0.45 - 0.65)
    assert a["equal_rollouts"]["es"]["std"] == pytest.approx(0.05) and a["busy_units"] == ["grpo_seed2"]
    assert b["seeds"] == [] and b["es_minus_grpo_equal_rollouts"] is None and b["parameters"] == 20000
    _unit_file(results, "b", "grpo", 1, ([0, 10], [0.0, 4.0], [0.2, 0.5]), digest="other")
    with pytest.raises(ValueError, match=r"unit b/grpo_seed1 ran on weights other"):
        aggregate(results)
    _unit_file(results, "b", "grpo", 1, ([0, 10], [0.0, 4.0], [0.2, 0.5]), ladder={"budget_rollouts": 20})
    with pytest.raises(ValueError, match="ran under other ladder settings"):
        aggregate(results)


def test_a_derived_arm_runs_with_its_own_settings_and_is_compared_to_es_apart(tmp_path):
    lr_scaled = DerivedArm("grpo_lr", "grpo", (("b", ("--grpo.learning_rate", "3e-4")),))
    ladder = Ladder(recipe="r.yaml", budget_rollouts=1, base_seconds=1, rungs=("a", "b"), seeds=(1, 2),
                    derived_arms=(lr_scaled,))  # fmt: skip
    # only where it has settings of its own; at rung a it is the grpo arm itself
    assert [u.name for u in units(ladder) if u.rung == "b"][:3] == ["b/es_seed1", "b/grpo_seed1", "b/grpo_lr_seed1"]
    assert not [u for u in units(ladder) if u.rung == "a" and u.arm == "grpo_lr"]
    command = unit_command(Unit("b", "grpo_lr", 2), ladder, {"budget_rollouts": 1, "budget_seconds": 1},
                           tmp_path, tmp_path)  # fmt: skip
    assert command[command.index("--arms") + 1] == "grpo" and command[-2:] == ["--grpo.learning_rate", "3e-4"]
    assert ladder.arm_names == ("es", "grpo", "grpo_lr")

    results = tmp_path / "results"
    record = {"parameters": 1000, "weights_sha256": "h", "budget_rollouts": 10, "budget_seconds": 5,
              "generation_cost_vs_smallest": 1.0, "ladder": {"budget_rollouts": 10}}  # fmt: skip
    results.mkdir()
    (results / "rungs.json").write_text(json.dumps({"a": record, "b": {**record, "parameters": 5000}}))
    for rung in ("a", "b"):
        for seed in (1, 2):
            _unit_file(results, rung, "es", seed, ([0, 10], [0.0, 2.0], [0.3, 0.5]))
            _unit_file(results, rung, "grpo", seed, ([0, 10], [0.0, 2.0], [0.3, 0.1]))
    _unit_file(results, "b", "grpo_lr", 1, ([0, 10], [0.0, 2.0], [0.3, 0.7]))  # seed 2 not run yet
    a, b = aggregate(results, ("a", "b"), (lr_scaled,))
    # the main comparison is the same with or without the derived arm
    assert a["seeds"] == b["seeds"] == [1, 2] and b["es_minus_grpo_equal_rollouts"] == pytest.approx(0.4)
    assert set(b["arms"]) == {"es", "grpo"} and b["units"]["grpo_lr"] == [1]
    assert a["derived"]["grpo_lr"]["runs_of"] == "grpo" and a["derived"]["grpo_lr"]["seeds"] == [1, 2]
    assert a["derived"]["grpo_lr"]["es_minus_grpo_lr_equal_rollouts"] == pytest.approx(0.4)
    derived = b["derived"]["grpo_lr"]
    assert derived["seeds"] == [1] and derived["settings"] == ["--grpo.learning_rate", "3e-4"]
    assert derived["es_minus_grpo_lr_equal_rollouts"] == pytest.approx(-0.2) and derived["final"]["mean"] == 0.7
    table = markdown([a, b])
    assert "| b | grpo_lr | --grpo.learning_rate 3e-4 | 1 | 0.500 ± 0.000 | 0.700 ± 0.000 | -0.200 |" in table
    assert "| a | grpo_lr | (= grpo) | 2 |" in table and "not yet paired" not in table
    assert plot([a, b], tmp_path / "gap.png") and (tmp_path / "gap.png").stat().st_size > 0
