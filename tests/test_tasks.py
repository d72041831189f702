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
        arithmetic_dataset("dev")


def test_arithmetic_validation_split_is_disjoint_from_test_and_is_what_the_carve_out_removes_from_train():
    from trl_es.recipes import ESScriptArguments
    from trl_es.scripts.train import load_splits

    validation, test = arithmetic_dataset("validation"), arithmetic_dataset("test")
    assert len(validation) == 500 and not set(validation["prompt"]) & set(test["prompt"])
    args = ESScriptArguments(dataset_name="builtin:arithmetic", dataset_validation_size=500, dataset_train_size=100)
    train, carved, held_out = load_splits(args)
    assert list(carved["prompt"]) == list(validation["prompt"])
    assert not set(carved["prompt"]) & set(arithmetic_dataset("train")["prompt"][:-500])
    assert list(train["prompt"]) == list(arithmetic_dataset("train", size=100)["prompt"])  # the same first rows
    assert list(held_out["prompt"]) == list(test["prompt"])
    whole, none, _ = load_splits(ESScriptArguments(dataset_name="builtin:arithmetic"))
    assert none is None and len(whole) == 90 * 90 - 1000
    with pytest.raises(ValueError, match="dataset_validation_size=9000: the training split 'train'"):
        load_splits(ESScriptArguments(dataset_name="builtin:arithmetic", dataset_validation_size=9000))


def test_validation_carve_out_of_a_local_dataset_removes_the_last_train_rows(tmp_path):
    import json

    from trl_es.recipes import ESScriptArguments
    from trl_es.scripts.train import load_splits

    path = tmp_path / "train.json"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) for i in range(10)))
    args = ESScriptArguments(dataset_name="json", dataset_data_files=str(path), dataset_validation_size=3)
    train, validation, test = load_splits(args)
    assert list(train["prompt"]) == [f"p{i}" for i in range(7)]
    assert list(validation["prompt"]) == ["p7", "p8", "p9"] and test is None


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
