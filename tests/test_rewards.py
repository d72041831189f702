"""Reward-function wrappers accept what GRPOTrainer accepts and name the culprit otherwise; lookup by name."""

import asyncio
import inspect
import math
import textwrap

import numpy as np
import pytest
import torch
from trl.trainer.utils import is_async_callable

from trl_es.rewards import (
    RewardFunctionError,
    _check_output,
    available_reward_functions,
    resolve_reward_func,
    resolve_reward_funcs,
    wrap_reward_funcs,
)


def wrapped(output):
    """A reward function returning ``output`` whatever it is called with, wrapped as ESTrainer wraps it."""

    def my_reward(completions, **kwargs):
        return output

    return wrap_reward_funcs([my_reward], ["my_reward"])[0]


# ---------------------------------------------------------------------------------------------- accepted outputs


@pytest.mark.parametrize(
    "output, expected",
    [
        ([0.5, 1, None], [0.5, 1.0, None]),
        ([True, False, None], [1.0, 0.0, None]),
        ((0.25, -2, 3), [0.25, -2.0, 3.0]),
        (iter([1.0, 2.0, 3.0]), [1.0, 2.0, 3.0]),
        ([np.float32(0.5), np.int64(2), np.bool_(True)], [0.5, 2.0, 1.0]),
        (np.array([0.5, 1.5, -1.0]), [0.5, 1.5, -1.0]),
        (np.array([True, False, True]), [1.0, 0.0, 1.0]),
        (np.array([1, 2, 3], dtype=np.int32), [1.0, 2.0, 3.0]),
        (np.array([1.0, None, 2.0], dtype=object), [1.0, None, 2.0]),
        (torch.tensor([0.5, 1.0, 2.0]), [0.5, 1.0, 2.0]),
        (torch.tensor([True, False, False]), [1.0, 0.0, 0.0]),
        (torch.tensor([1, 0, 7]), [1.0, 0.0, 7.0]),
        (torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16, requires_grad=True), [1.0, 2.0, 3.0]),
        ([torch.tensor(1.0), np.array(2.0), np.array(None, dtype=object)], [1.0, 2.0, None]),
        ([10**30, -(10**30), 0], [1e30, -1e30, 0.0]),
    ],
    ids=lambda value: type(value).__name__,
)
def test_accepted_outputs_become_a_plain_list_of_float_or_none(output, expected):
    result = wrapped(output)(prompts=["p"] * 3, completions=["c"] * 3)
    assert type(result) is list
    assert result == expected
    assert all(value is None or type(value) is float for value in result)
    # what GRPO's _calculate_rewards does with it next
    torch.tensor([math.nan if v is None else v for v in result], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- rejected outputs


@pytest.mark.parametrize(
    "output, message",
    [
        ({"a": 1.0, "b": 0.0, "c": 1.0}, r"'my_reward' returned a dict \(keys \['a', 'b', 'c'\]\).*its keys would"),
        ("1.0", r"'my_reward' returned '1.0' \(str\)"),
        (["1.0", 2.0, 3.0], r"'my_reward' returned '1.0' \(str\) for completion 0.*not text"),
        ([1.0, [2.0], 3.0], r"'my_reward' returned \[2.0\] \(list\) for completion 1.*not nested"),
        ([[1.0, 2.0, 3.0]], r"'my_reward' returned 1 values for 3 completions"),
        ([1.0, 2.0], r"'my_reward' returned 2 values for 3 completions"),
        ([1.0, 2.0, math.inf], r"'my_reward' returned inf for completion 2"),
        ([-math.inf, 2.0, 3.0], r"'my_reward' returned -inf for completion 0"),
        ([1.0, 10**400, 3.0], r"'my_reward' returned 1000.* \(int\) for completion 1: too large for a float"),
        ([1.0, 2.0, 1e39], r"'my_reward' returned 1e\+39 \(float\) for completion 2: beyond the float32 range"),
        ([1.0, 2.0, 1 + 2j], r"'my_reward' returned \(1\+2j\) \(complex\) for completion 2"),
        ({1.0, 2.0, 3.0}, r"'my_reward' returned a set, which has no order"),
        (None, r"'my_reward' returned None \(NoneType\)"),
        (1.0, r"'my_reward' returned 1.0 \(float\)"),
        (torch.tensor(1.0), r"'my_reward' returned a Tensor of shape \(\); it must be 1-D"),
        (torch.ones(3, 1), r"'my_reward' returned a Tensor of shape \(3, 1\); it must be 1-D"),
        (np.ones((1, 3)), r"'my_reward' returned a ndarray of shape \(1, 3\)"),
        ([np.ones(2), 1.0, 1.0], r"'my_reward' returned a ndarray of shape \(2,\) for completion 0"),
        (object(), r"'my_reward' returned object; it must return a list with one float \(or None\) per completion"),
    ],
)
def test_rejected_outputs_name_the_function(output, message):
    with pytest.raises(RewardFunctionError, match=message):
        wrapped(output)(prompts=["p"] * 3, completions=["c"] * 3)


@pytest.mark.parametrize(
    "output", [[1.0, math.nan, 0.0], np.array([1.0, np.nan, 0.0]), torch.tensor([1.0, float("nan"), 0.0])]
)
def test_nan_is_an_error_naming_function_and_completion(output):
    with pytest.raises(RewardFunctionError, match=r"'my_reward' returned NaN for completion 1.*return None"):
        wrapped(output)(prompts=["p"] * 3, completions=["c"] * 3)


def test_exception_inside_the_function_is_named():
    def broken(completions, **kwargs):
        return [1 / 0 for _ in completions]

    with pytest.raises(RewardFunctionError, match=r"Reward function 'broken' raised ZeroDivisionError") as info:
        wrap_reward_funcs([broken], ["broken"])[0](completions=["a"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# ---------------------------------------------------------------------------------------------- calling contract


def count_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_call_without_prompts_takes_the_count_from_completions():
    # GRPO's environment-owned rewards and direct calls need not pass `prompts`.
    func = wrap_reward_funcs([count_reward], ["count_reward"])[0]
    assert func(completions=["a", "bb"]) == [1.0, 2.0]
    with pytest.raises(RewardFunctionError, match="returned 2 values for 3 completions"):
        wrap_reward_funcs([lambda completions, **kw: [1.0, 2.0]], ["short"])[0](completions=["a", "b", "c"])


def test_positional_call_takes_the_count_from_the_bound_argument():
    func = wrap_reward_funcs([count_reward], ["count_reward"])[0]
    assert func(["a", "bb", "ccc"]) == [1.0, 2.0, 3.0]

    def prompts_first(prompts, completions, **kwargs):
        return [1.0]

    with pytest.raises(RewardFunctionError, match="returned 1 values for 2 completions"):
        wrap_reward_funcs([prompts_first], ["prompts_first"])[0](["p", "p"], ["a", "b"])


def test_count_falls_back_to_prompts_and_is_skipped_without_either():
    def env_reward(environments, **kwargs):
        return [1.0] * len(environments)

    func = wrap_reward_funcs([env_reward], ["env_reward"])[0]
    assert func(environments=[object()] * 3) == [1.0, 1.0, 1.0]  # no count known: no length check, no KeyError
    with pytest.raises(RewardFunctionError, match="returned 3 values for 2 completions"):
        func(prompts=["p", "q"], environments=[object()] * 3)


def test_wrapper_keeps_name_signature_and_sync_async_nature():
    async def async_reward(completions, **kwargs):
        await asyncio.sleep(0)
        return np.array([True, True])

    sync_func, async_func = wrap_reward_funcs([count_reward, async_reward], ["count_reward", "async_reward"])
    assert sync_func.__name__ == "count_reward" and async_func.__name__ == "async_reward"
    assert inspect.signature(sync_func) == inspect.signature(count_reward)
    assert not is_async_callable(sync_func) and is_async_callable(async_func)
    assert asyncio.run(async_func(completions=["a", "b"])) == [1.0, 1.0]
    with pytest.raises(RewardFunctionError, match="'async_reward' returned 2 values for 3 completions"):
        asyncio.run(async_func(completions=["a", "b", "c"]))


def test_reward_models_are_not_wrapped():
    model = torch.nn.Linear(1, 1)
    assert wrap_reward_funcs([model], ["linear"])[0] is model


def test_check_output_without_expected_count():
    assert _check_output("f", [1, None], None) == [1.0, None]


# ---------------------------------------------------------------------------------------------- lookup by name


def test_bare_names_resolve_in_trl_es_tasks_and_trl_rewards():
    import trl.rewards

    from trl_es.tasks import arithmetic_accuracy

    assert resolve_reward_func("arithmetic_accuracy") is arithmetic_accuracy
    assert resolve_reward_func("accuracy_reward") is trl.rewards.accuracy_reward
    available = available_reward_functions()
    assert {"arithmetic_accuracy", "countdown_reward", "accuracy_reward", "think_format_reward"} <= set(available)
    # datasets, factories and modules are not reward functions
    assert not {"arithmetic_dataset", "get_cosine_scaled_reward", "accuracy_rewards"} & set(available)


def test_typo_lists_the_available_names_and_the_forms():
    with pytest.raises(ValueError, match=r"unknown reward function 'arithmetic_acuracy'") as info:
        resolve_reward_func("arithmetic_acuracy")
    message = str(info.value)
    assert "'arithmetic_accuracy'" in message and "'accuracy_reward'" in message
    assert "dotted path" in message and "hub reward-model id" in message


def test_a_callable_that_is_not_a_reward_function_is_refused():
    with pytest.raises(ValueError, match=r"trl_es.tasks.arithmetic_dataset exists but is not a reward function"):
        resolve_reward_func("arithmetic_dataset")


@pytest.mark.parametrize("spec, kind", [(3, "int"), (0.5, "float"), ({"name": "x"}, "dict"), (None, "NoneType")])
def test_non_string_spec_names_its_type(spec, kind):
    with pytest.raises(ValueError, match=rf"is a {kind}; every reward_funcs entry must be a string"):
        resolve_reward_func(spec)


def test_local_folder_is_a_reward_model_path(tmp_path):
    assert resolve_reward_func(str(tmp_path)) == str(tmp_path)


def test_hub_id_is_kept_and_a_missing_path_is_an_error(tmp_path):
    assert resolve_reward_func("some-org/some-reward-model") == "some-org/some-reward-model"
    with pytest.raises(ValueError, match=r"looks like a path, but no such folder exists"):
        resolve_reward_func(str(tmp_path / "missing" / "model"))
    with pytest.raises(ValueError, match=r"looks like a path"):
        resolve_reward_func("./not-here")


def test_dotted_paths(tmp_path, monkeypatch):
    import trl.rewards

    from trl_es.tasks.arithmetic import arithmetic_accuracy

    assert resolve_reward_func("trl.rewards.accuracy_reward") is trl.rewards.accuracy_reward
    assert resolve_reward_func("trl_es.tasks.arithmetic.arithmetic_accuracy") is arithmetic_accuracy
    with pytest.raises(ImportError, match=r"reward function 'no_such_module.score': cannot import it"):
        resolve_reward_func("no_such_module.score")
    with pytest.raises(ValueError, match=r"module 'trl.rewards' has no attribute 'no_such_reward'"):
        resolve_reward_func("trl.rewards.no_such_reward")
    with pytest.raises(ValueError, match=r"is a str, not a callable"):
        resolve_reward_func("trl_es.__version__")

    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            class Scorer:
                @staticmethod
                def score(completions, **kwargs):
                    return [1.0] * len(completions)
            """
        )
    )
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward_func("my_rewards.Scorer.score")(completions=["a"]) == [1.0]
    # a missing import inside the user's module is their error, reported with the module it happened in
    with pytest.raises(ImportError, match=r"importing module 'broken_rewards' failed.*no_such_dependency"):
        resolve_reward_func("broken_rewards.score")


def test_resolve_reward_funcs_accepts_a_list_or_a_single_name():
    from trl_es.tasks import arithmetic_accuracy, countdown_reward

    assert resolve_reward_funcs("arithmetic_accuracy") == [arithmetic_accuracy]
    assert resolve_reward_funcs(["arithmetic_accuracy", "countdown_reward"]) == [arithmetic_accuracy, countdown_reward]
    assert resolve_reward_funcs(None) == []
    assert resolve_reward_funcs([count_reward]) == [count_reward]


@pytest.mark.parametrize("specs", [3, {"arithmetic_accuracy": 1.0}, 2.5])
def test_resolve_reward_funcs_names_the_field_for_other_types(specs):
    with pytest.raises(ValueError, match=rf"reward_funcs must be a list .* got {type(specs).__name__}"):
        resolve_reward_funcs(specs)


def test_resolve_reward_funcs_names_the_bad_entry():
    with pytest.raises(ValueError, match=r"reward_funcs\[1\]: unknown reward function 'acuracy_reward'"):
        resolve_reward_funcs(["arithmetic_accuracy", "acuracy_reward"])
    with pytest.raises(ValueError, match=r"reward_funcs\[0\]: reward function 7 is a int"):
        resolve_reward_funcs([7])


# ---------------------------------------------------------------------------------------------- in the trainer


def test_tensor_and_numpy_rewards_train(tiny_model_dir, tmp_path):
    from conftest import es_config

    from trl_es import ESTrainer
    from trl_es.tasks import arithmetic_dataset

    def bool_tensor_reward(completions, **kwargs):
        return torch.tensor([len(c) % 2 == 0 for c in completions])

    def numpy_reward(completions, **kwargs):
        return np.array([len(c) for c in completions], dtype=np.int64)

    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=[bool_tensor_reward, numpy_reward],
        args=es_config(tmp_path, max_steps=1, logging_steps=1),
        train_dataset=arithmetic_dataset("train", size=16),
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert 0.0 <= logged["rewards/bool_tensor_reward/mean"] <= 1.0
    assert logged["rewards/numpy_reward/mean"] > 0
    # The trainer's wrapped functions can be called the way environment-owned rewards are: no `prompts`.
    assert trainer.reward_funcs[0](completions=["ab", "abc"]) == [1.0, 0.0]
    assert trainer.reward_funcs[1](completions=["ab", "abc"]) == [2.0, 3.0]
