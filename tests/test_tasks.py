"""Built-in tasks: deterministic disjoint splits, rewards checked by hand, hub tasks fail clearly offline."""

import pytest

from trl_es.tasks import arithmetic_accuracy, arithmetic_dataset, countdown_reward, hub_tasks


def test_arithmetic_splits_are_deterministic_and_disjoint():
    train, test = arithmetic_dataset("train"), arithmetic_dataset("test")
    assert len(train) + len(test) == 90 * 90
    assert not set(train["prompt"]) & set(test["prompt"])
    assert list(arithmetic_dataset("test", size=5)["prompt"]) == list(test["prompt"][:5])
    a, b = test[0]["prompt"].rstrip("=").split("+")
    assert int(a) + int(b) == int(test[0]["answer"])
    chat = arithmetic_dataset("test", size=1, conversational=True)[0]["prompt"]
    assert chat == [{"role": "user", "content": test[0]["prompt"]}]
    with pytest.raises(ValueError, match="unknown split"):
        arithmetic_dataset("validation")


def test_arithmetic_accuracy():
    completions = ["85", " 85 ", "58", "", "eighty", "$85$"]
    assert arithmetic_accuracy(completions, ["85"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert arithmetic_accuracy([[{"role": "assistant", "content": "12"}]], ["12"]) == [1.0]


def test_countdown_reward():
    nums, target = [3, 5, 7], 22
    completions = [
        "<think>..</think><answer> 3 * 5 + 7 </answer>",  # right
        "<answer>(7 + 5) * 3</answer>",  # 36: wrong value
        "<answer>5 * 3 + 7 + 3</answer>",  # uses 3 twice
        "<answer>__import__('os')</answer>",  # not arithmetic: rejected, never evaluated
        "no answer tag",
        "<answer>7 / 0 + 3 + 5</answer>",
    ]
    assert countdown_reward(completions, [nums] * 6, [target] * 6) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_hub_tasks_fail_clearly_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (offline mode)")

    monkeypatch.setattr(hub_tasks, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="Could not load the hub dataset 'openai/gsm8k'.*needs network"):
        hub_tasks.gsm8k()
