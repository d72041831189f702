"""ESConfig names the field for values of the wrong type or non-finite; recipe type checks; strict YAML."""

import pathlib
import textwrap
import warnings

import numpy as np
import pytest
import yaml
from trl import GRPOConfig, ModelConfig

from trl_es import ESConfig
from trl_es.config import FINITE_FIELDS, _has_accelerator, check_recipe_types, load_yaml_strict


# recipes/accelerate holds `accelerate launch` configs, not training recipes
RECIPES = sorted(
    p for p in (pathlib.Path(__file__).parent.parent / "recipes").rglob("*.yaml") if p.parent.name != "accelerate"
)


def config(**overrides):
    return ESConfig(output_dir="/tmp/trl-es-test-config", report_to="none", bf16=False, **overrides)


# ---------------------------------------------------------------------------------------------- ESConfig


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("population_size", 4.0, r"ESConfig.population_size: expected an integer \(write 4, not 4.0\), got float"),
        ("population_size", [4], r"ESConfig.population_size: expected an integer, got list \[4\]"),
        ("population_size", "4", r"ESConfig.population_size: expected an integer, got str '4'"),
        ("population_size", True, r"ESConfig.population_size: expected an integer, got bool True"),
        ("perturbation_rank", 1.5, r"ESConfig.perturbation_rank: expected an integer, got float 1.5"),
        ("population_batch_size", 2.0, r"ESConfig.population_batch_size: expected an integer \(write 2"),
        ("sigma", "1e-3", r"ESConfig.sigma: expected a number, not text \(YAML 1.1 reads 1e-4 as a string"),
        ("sigma", [0.1], r"ESConfig.sigma: expected a number, got list"),
        ("antithetic", "false", r"ESConfig.antithetic: expected true or false \(unquoted\), got str 'false'"),
        ("fitness_shaping", 1, r"ESConfig.fitness_shaping: expected a string, got int 1"),
        ("perturbation_target_modules", "q_proj", r"ESConfig.perturbation_target_modules: expected a list"),
        ("perturbation_target_modules", ["q_proj", 3], r"perturbation_target_modules: item 1 \(3\): expected a str"),
        ("learning_rate", "4e-4", r"ESConfig.learning_rate: expected a number, not text"),
        ("num_generations", 2.0, r"ESConfig.num_generations: expected an integer \(write 2, not 2.0\)"),
    ],
)
def test_es_field_of_the_wrong_type_is_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        config(**{field: value})


@pytest.mark.parametrize("field", FINITE_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_named(field, value):
    with pytest.raises(ValueError, match=rf"ESConfig.{field} must be finite, got {value}"):
        config(**{field: value})


def test_weight_decay_of_the_wrong_type_is_named():
    # weight_decay is a TrainingArguments field: not type-checked by annotation, but must be a finite number.
    with pytest.raises(ValueError, match=r"ESConfig.weight_decay must be a number, got str '0.1'"):
        config(weight_decay="0.1")


def test_negative_max_grad_norm_and_learning_rate_are_refused():
    with pytest.raises(ValueError, match=r"max_grad_norm must be >= 0 \(0 disables clipping\), got -1.0"):
        config(max_grad_norm=-1.0)
    with pytest.raises(ValueError, match=r"learning_rate must be >= 0, got -0.001"):
        config(learning_rate=-1e-3)


def test_numpy_numbers_and_ints_for_floats_are_accepted():
    args = config(population_size=np.int64(4), sigma=np.float32(0.5), learning_rate=1, max_grad_norm=0)
    assert args.population_size == 4 and args.learning_rate == 1


def test_defaults_and_grpo_conversion_pass_the_type_check():
    config()
    grpo = GRPOConfig(output_dir="/tmp/trl-es-test-config", report_to="none", bf16=False, learning_rate=3e-4)
    assert ESConfig.from_grpo_config(grpo).learning_rate == 3e-4


@pytest.mark.skipif(_has_accelerator(), reason="fp16 is real mixed precision on a GPU")
def test_fp16_on_cpu_warns_that_it_does_nothing():
    with pytest.warns(UserWarning, match=r"fp16=True has no effect on CPU.*trains in fp32"):
        args = config(fp16=True)
    assert args.fp16  # a warning, not a change: accelerate keeps fp32 on CPU either way


def test_fp16_with_use_cpu_warns():
    with pytest.warns(UserWarning, match=r"fp16=True has no effect on CPU"):
        config(fp16=True, use_cpu=True)


def _reuse_warnings(**overrides) -> tuple[ESConfig, list[str]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        made = config(**overrides)
    return made, [str(w.message) for w in record if "steps_per_generation" in str(w.message)]


def test_steps_per_generation_is_named_as_ignored_and_every_es_step_gets_its_own_prompts():
    from trl_es.config import IGNORED_GRPO_FIELDS

    made, found = _reuse_warnings(steps_per_generation=2, per_device_train_batch_size=8)
    assert len(found) == 1 and "ignores these GRPOConfig fields: steps_per_generation=2" in found[0]
    assert IGNORED_GRPO_FIELDS["steps_per_generation"] in found[0]
    # GRPO's sampler now hands each ES step the rows one GRPO optimizer step trains on
    assert (made.steps_per_generation, made.generation_batch_size) == (1, 8)
    made, found = _reuse_warnings(per_device_train_batch_size=8, generation_batch_size=16)  # the other way to set it
    assert "generation_batch_size=16" in found[0] and made.generation_batch_size == 8
    # below the accumulation GRPO's extra batches used to go unscored; now one batch holds the step's rows
    made, found = _reuse_warnings(steps_per_generation=1, gradient_accumulation_steps=2, per_device_train_batch_size=8)
    assert found and (made.steps_per_generation, made.generation_batch_size) == (2, 16)
    with pytest.raises(ValueError, match=r"ES step takes 3 rows .*not whole prompts of num_generations=2"):
        config(steps_per_generation=2, per_device_train_batch_size=3, num_generations=2)


def test_default_steps_per_generation_follows_accumulation_without_warning():
    assert _reuse_warnings()[1] == []
    assert _reuse_warnings(gradient_accumulation_steps=4)[1] == []


# ---------------------------------------------------------------------------------------------- recipe types


def _train_dataclasses():
    from trl_es.recipes import ESScriptArguments

    return (ESScriptArguments, ESConfig, ModelConfig)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_pass_the_type_check(path):
    from trl_es.recipes import train_config

    recipe = load_yaml_strict(str(path))
    assert check_recipe_types(train_config(recipe), _train_dataclasses()) == []
    assert check_recipe_types(recipe.get("grpo") or {}, (GRPOConfig,)) == []


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("population_size", 4.0, "population_size: expected an integer (write 4, not 4.0), got float 4.0"),
        ("population_size", 4.5, "population_size: expected an integer, got float 4.5"),
        ("population_size", [32], "population_size: expected an integer, got list [32]"),
        ("max_steps", True, "max_steps: expected an integer, got bool True"),
        ("antithetic", "no", "antithetic: expected true or false (unquoted), got str 'no'"),
        ("bf16", "false", "bf16: expected true or false (unquoted), got str 'false'"),
        ("learning_rate", "1e-4", "learning_rate: expected a number, not text (YAML 1.1 reads 1e-4 as a string"),
        ("reward_funcs", "arithmetic_accuracy", "reward_funcs: expected a list (write ['arithmetic_accuracy']"),
        ("lora_target_modules", 3, "lora_target_modules: expected a list (write [3] for one item), got int 3"),
        ("model_init_kwargs", ["dtype"], "model_init_kwargs: expected dict[str, Any] or str or null, got list"),
        ("lr_scheduler_type", 3, "lr_scheduler_type: expected SchedulerType or str, got int 3"),
    ],
)
def test_recipe_values_of_the_wrong_type_are_reported_by_key(key, value, message):
    (problem,) = check_recipe_types({key: value}, _train_dataclasses())
    assert problem.startswith(message), problem


def test_recipe_check_reports_every_bad_key_and_skips_unknown_ones():
    recipe = {"population_size": 4.0, "sigma": 0.01, "antithetic": "yes", "not_a_field": object()}
    problems = check_recipe_types(recipe, _train_dataclasses())
    assert [p.split(":")[0] for p in problems] == ["population_size", "antithetic"]


def test_recipe_check_accepts_enum_values_and_unions():
    recipe = {"lr_scheduler_type": "linear", "save_strategy": "no", "report_to": ["none"], "logging_steps": 10}
    assert check_recipe_types(recipe, _train_dataclasses()) == []


# ---------------------------------------------------------------------------------------------- strict YAML


def write(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def test_duplicate_key_is_named_with_both_lines(tmp_path):
    path = write(
        tmp_path,
        """
        sigma: 0.01
        population_size: 32
        sigma: 0.02
        """,
    )
    with pytest.raises(
        ValueError, match=r"recipe.yaml: found duplicate key 'sigma' \(first on line 1, again on line 3\)"
    ):
        load_yaml_strict(path)
    assert yaml.safe_load(open(path)) == {"sigma": 0.02, "population_size": 32}  # what we protect against


def test_duplicate_key_inside_a_section_is_named(tmp_path):
    path = write(
        tmp_path,
        """
        learning_rate: 1.0e-4
        grpo:
          learning_rate: 6.0e-4
          temperature: 1.0
          learning_rate: 3.0e-4
        """,
    )
    with pytest.raises(ValueError, match=r"duplicate key 'learning_rate' \(first on line 3, again on line 5\)"):
        load_yaml_strict(path)


def test_same_key_in_different_sections_and_merge_overrides_are_fine(tmp_path):
    path = write(
        tmp_path,
        """
        base: &base {learning_rate: 1.0e-4, temperature: 0.0}
        es:
          <<: *base
          learning_rate: 2.0e-4
        grpo:
          learning_rate: 6.0e-4
        """,
    )
    recipe = load_yaml_strict(path)
    assert recipe["es"] == {"learning_rate": 2e-4, "temperature": 0.0}
    assert recipe["grpo"] == {"learning_rate": 6e-4}


def test_exponent_without_a_dot_is_a_float(tmp_path):
    path = write(
        tmp_path,
        """
        learning_rate: 1e-4
        sigma: 3E-3
        max_steps: 10
        run_name: "1e-4"
        seed: 042
        """,
    )
    assert load_yaml_strict(path) == {
        "learning_rate": 1e-4,
        "sigma": 3e-3,
        "max_steps": 10,
        "run_name": "1e-4",
        "seed": yaml.safe_load("042"),
    }
    assert yaml.safe_load("a: 1e-4") == {"a": "1e-4"}  # the global SafeLoader is unchanged


def test_every_grpo_config_field_is_honoured_or_named_as_ignored():
    """A field a new TRL release adds to GRPOConfig fails here until it is sorted into one of the two lists."""
    import dataclasses

    from transformers import TrainingArguments
    from trl import GRPOConfig

    from trl_es.config import HONOURED_GRPO_FIELDS, IGNORED_GRPO_FIELDS

    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)} - trainer_fields
    honoured, ignored = set(HONOURED_GRPO_FIELDS), set(IGNORED_GRPO_FIELDS)
    assert not honoured & ignored, f"both honoured and ignored: {sorted(honoured & ignored)}"
    assert grpo_fields - honoured - ignored == set(), "GRPOConfig fields ESTrainer says nothing about"
    assert (honoured | ignored) - grpo_fields == set(), "listed fields GRPOConfig no longer has"


def test_ignored_fields_are_named_with_their_reason_in_one_warning(tmp_path):
    with pytest.warns(
        UserWarning, match=r"ignores these GRPOConfig fields: loss_type='grpo': shapes GRPO's"
    ) as record:
        ESConfig(str(tmp_path), loss_type="grpo", entropy_coef=0.1, report_to="none")
    messages = [str(w.message) for w in record if "ignores these GRPOConfig fields" in str(w.message)]
    assert len(messages) == 1 and "entropy_coef=0.1" in messages[0]


def test_plain_grpo_config_gets_es_optimisation_defaults_unless_the_user_set_them(tmp_path):
    from trl import GRPOConfig

    defaults = ESConfig.from_grpo_config(GRPOConfig(str(tmp_path), report_to="none", bf16=False))
    es = ESConfig(str(tmp_path), report_to="none")
    assert (defaults.learning_rate, defaults.optim, defaults.max_grad_norm) == (es.learning_rate, "sgd", 0.0)
    assert defaults.disable_dropout is True and defaults.activation_checkpointing is False
    # the data and decoding of the GRPO script are kept, GRPO's defaults included
    assert (defaults.num_generations, defaults.temperature, defaults.per_device_train_batch_size) == (8, 1.0, 8)
    chosen = ESConfig.from_grpo_config(
        GRPOConfig(str(tmp_path), learning_rate=3e-4, optim="adamw_torch", report_to="none", bf16=False)
    )
    assert (chosen.learning_rate, chosen.optim) == (3e-4, "adamw_torch")


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        dict(learning_rate=3e-4, optim="adamw_torch", max_grad_norm=0.5),
        dict(num_generations=4, temperature=0.7, per_device_train_batch_size=16, steps_per_generation=2),
        dict(max_steps=7, logging_steps=3, beta=0.1, seed=5, weight_decay=0.1, lr_scheduler_type="constant"),
    ],
)
def test_a_converted_grpo_config_is_esconfig_given_grpos_data_and_the_same_arguments(tmp_path, arguments):
    import dataclasses

    from trl import GRPOConfig

    common = dict(output_dir=str(tmp_path), report_to="none", bf16=False)
    grpo = GRPOConfig(**common, **arguments)
    converted = ESConfig.from_grpo_config(grpo)
    # What the GRPO run would have used for data, decoding and logging (its defaults where the script set nothing)
    grpo_data = {
        name: getattr(grpo, name)
        for name in ("per_device_train_batch_size", "num_generations", "temperature", "logging_steps")
    }
    direct = ESConfig(**common, **(grpo_data | arguments))
    differ = [f.name for f in dataclasses.fields(ESConfig) if getattr(converted, f.name) != getattr(direct, f.name)]
    assert differ == []


def test_default_learning_rate_is_qiu_step_for_the_sigma_shaping_and_optimizer(tmp_path):
    def lr(**values):
        return ESConfig(str(tmp_path), report_to="none", **values).learning_rate

    # SGD: sigma^2 / (2 * std of the shaped fitness); centered ranks have std 1 / sqrt(12)
    assert lr() == pytest.approx(1e-3**2 / 2 * 12**0.5)
    assert lr(sigma=0.01) == pytest.approx(100 * lr())
    assert lr(fitness_shaping="zscore") == pytest.approx(0.5e-6)
    # per-weight normalising optimizers: sigma / (2 sqrt(N))
    assert lr(optim="adamw_torch", population_size=16) == pytest.approx(1e-3 / 8)
    assert lr(learning_rate=4e-4) == 4e-4  # set: kept


# A value other than GRPOConfig's default for each of its own fields where the generic rule (flip a bool, bump a
# number, set a None) would not give a valid GRPOConfig.
_NON_DEFAULT_GRPO_VALUES = {
    "model_init_kwargs": {"dtype": "float32"},
    "num_generations": 4,
    "num_generations_eval": 2,
    "pad_to_multiple_of": 8,
    "generation_batch_size": 16,
    "steps_per_generation": 2,
    "top_p": 0.5,
    "min_p": 0.1,
    "generation_kwargs": {"no_repeat_ngram_size": 2},
    "chat_template_kwargs": {"enable_thinking": False},
    "repetition_penalty": 1.1,
    "cache_implementation": "static",
    "vllm_mode": "server",
    "vllm_model_impl": "transformers",
    "vllm_structured_outputs_regex": "[0-9]+",
    "vllm_server_base_url": "http://127.0.0.1:8000",
    "vllm_server_host": "127.0.0.1",
    "vllm_gpu_memory_utilization": 0.5,
    "ref_model_mixup_alpha": 0.3,
    "top_entropy_quantile": 0.5,
    "importance_sampling_level": "sequence",
    "reward_weights": [1.0],
    "multi_objective_aggregation": "normalize_then_sum",
    "scale_rewards": "batch",
    "loss_type": "grpo",
    "vllm_importance_sampling_mode": "token_truncate",
    "log_completions_hub_repo": "me/completions",
    "transformers_continuous_batching_config": {"max_batch_tokens": 64},
}


# Fields that need another setting to be valid under ES (ESConfig names the combination in an error otherwise).
_COMPANIONS = {"sync_ref_model": {"beta": 0.1}, "log_completions_hub_repo": {"log_completions": True}}


def _non_default(field):
    if field.name in _NON_DEFAULT_GRPO_VALUES:
        return _NON_DEFAULT_GRPO_VALUES[field.name]
    default = field.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default * 0.5 + 0.25
    if default is None:
        return 0.5 if "float" in str(field.type) else 2
    raise AssertionError(f"no non-default value for {field.name}={default!r}: add one to _NON_DEFAULT_GRPO_VALUES")


def _grpo_own_fields():
    import dataclasses

    from transformers import TrainingArguments
    from trl import GRPOConfig

    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f for f in dataclasses.fields(GRPOConfig) if f.name not in trainer_fields]


@pytest.mark.parametrize("field", _grpo_own_fields(), ids=lambda f: f.name)
def test_every_grpo_field_set_to_a_non_default_value_is_honoured_or_warned(tmp_path, field):
    """Set in a GRPOConfig that ESTrainer converts: an honoured field keeps the value, an ignored one is named."""
    import warnings

    from trl import GRPOConfig

    from trl_es.config import HONOURED_GRPO_FIELDS, IGNORED_GRPO_FIELDS

    value = _non_default(field)
    assert value != field.default
    grpo = GRPOConfig(
        str(tmp_path), report_to="none", bf16=False, **_COMPANIONS.get(field.name, {}), **{field.name: value}
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        converted = ESConfig.from_grpo_config(grpo)
    named = [str(w.message) for w in record if f"{field.name}={getattr(grpo, field.name)!r}" in str(w.message)]
    if field.name in IGNORED_GRPO_FIELDS:
        assert len(named) == 1 and IGNORED_GRPO_FIELDS[field.name] in named[0]
    else:
        assert field.name in HONOURED_GRPO_FIELDS
        assert getattr(converted, field.name) == getattr(grpo, field.name)


def test_every_es_field_has_a_row_in_the_field_table():
    """A new ESConfig field cannot be forgotten in the trajectory, seed-log, finiteness or strategy checks: it must be
    given roles in config_fields.FIELD_ROLES, or be listed as having none."""
    import dataclasses

    from trl import GRPOConfig

    from trl_es.config_fields import FIELD_ROLES, NO_ROLE_FIELDS

    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    es_fields = {f.name for f in dataclasses.fields(ESConfig) if f.name not in grpo}
    assert es_fields - set(FIELD_ROLES) == set(NO_ROLE_FIELDS)
    assert not set(NO_ROLE_FIELDS) & set(FIELD_ROLES)
    assert set(FIELD_ROLES) <= es_fields | grpo  # no row for a field that does not exist


def test_a_strategy_field_set_for_another_strategy_is_named():
    with pytest.raises(ValueError, match=r"ga_elite=False is read by strategy 'ga' only"):
        ESConfig("out", ga_elite=False, bf16=False)
    with pytest.raises(ValueError, match=r"sigma_decay=0.5 is read by strategy 'gaussian' and 'ga' only"):
        ESConfig("out", strategy="cma", perturbation="svd", sigma_decay=0.5, bf16=False)
    assert ESConfig("out", strategy="ga", sigma_decay=0.5, bf16=False).sigma_decay == 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(vllm_dtype="bf16", use_vllm=True),
            r"vllm_dtype must be None \(the model's dtype\) or one of \['bfloat16'",
        ),
        (dict(vllm_dtype="bfloat16"), r"vllm_dtype='bfloat16' is the dtype of a vLLM engine, but use_vllm=False"),
        (
            dict(vllm_dtype="float16", use_vllm=True, vllm_mode="server"),
            r"with vllm_mode='server' the server runs in the dtype it was started with",
        ),
    ],
)
def test_a_vllm_dtype_that_cannot_be_honoured_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)
    assert config(vllm_dtype="bfloat16", use_vllm=True, vllm_mode="colocate").vllm_dtype == "bfloat16"
