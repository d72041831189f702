"""The seed log: a run writes es_seed_log.jsonl; `trl-es replay` rebuilds the saved weights bit-exactly (CPU)."""

import json
import logging
import os

import pytest
import torch
from conftest import es_config, length_reward, snapshot
from safetensors.torch import load_file

from trl_es import ESTrainer
from trl_es.cli import main
from trl_es.seed_log import LOG_NAME, read_seed_log, weights_hash
from trl_es.seed_replay import replay
from trl_es.tasks import arithmetic_dataset


def train_run(model_dir, output_dir, perturbation="full", optim="sgd", **overrides):
    """A short run with sampled decoding (a non-zero update on the random tiny model), weight decay (two param
    groups) and the default linear schedule (a different lr every step); saved like `trl-es train` saves."""
    resume = overrides.pop("resume_from_checkpoint", None)
    peft_config = None
    if perturbation == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    else:
        overrides["perturbation"] = perturbation
    values = dict(optim=optim, weight_decay=0.1, temperature=1.0, seed=3) | overrides
    trainer = ESTrainer(
        model_dir,
        reward_funcs=length_reward,
        args=es_config(output_dir, **values),
        train_dataset=arithmetic_dataset("train", size=16),
        peft_config=peft_config,
    )
    before = snapshot(trainer.model)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(output_dir))
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    return trainer, changed


def saved_weights(folder) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            return load_file(os.path.join(folder, name))
    raise AssertionError(f"no saved weights in {folder}: {sorted(os.listdir(folder))}")


def assert_same_saved_weights(trained_dir, replayed_dir) -> None:
    trained, replayed = saved_weights(trained_dir), saved_weights(replayed_dir)
    assert sorted(trained) == sorted(replayed)
    for name, tensor in trained.items():
        assert torch.equal(tensor, replayed[name]), f"{name} differs after replay"


def cli_replay(model_dir, log_path, output_dir) -> None:
    argv = ["replay", "--model", str(model_dir), "--seed_log", str(log_path), "--output_dir", str(output_dir)]
    assert main(argv) == 0


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
@pytest.mark.parametrize("perturbation", ["full", "lora", "low_rank"])
def test_replay_rebuilds_the_saved_model_bit_exactly(tiny_model_dir, tmp_path, perturbation, optim):
    trainer, changed = train_run(tiny_model_dir, tmp_path / "run", perturbation, optim)
    assert changed, "the run must move the weights, or replaying it proves nothing"
    assert trainer._inplace_update == (optim == "sgd")  # plain SGD: the update was applied from the seeds
    log = read_seed_log(tmp_path / "run" / LOG_NAME)
    assert [record.step for record in log.records] == [0, 1]
    assert len({record.lr[0] for record in log.records}) == 2  # the schedule moved the lr: replay must use each
    assert log.header["es"]["perturbation"] == perturbation
    cli_replay(tiny_model_dir, tmp_path / "run" / LOG_NAME, tmp_path / "replayed")
    assert_same_saved_weights(tmp_path / "run", tmp_path / "replayed")


@pytest.mark.parametrize("perturbation", ["full", "low_rank"])
def test_anchor_decay_sigma_decay_and_prompt_groups_replay_bit_exactly(tiny_model_dir, tmp_path, perturbation):
    """The anchor pull is rebuilt from the base weights; the sigma schedule and the prompt groups live in the
    recorded coefficients. Three steps, so the pull acts on moved weights twice."""
    settings = dict(anchor_decay=0.5, sigma_decay=0.9, prompt_groups=2, max_steps=3)
    _, changed = train_run(tiny_model_dir, tmp_path / "run", perturbation, "adamw_torch", **settings)
    assert changed
    log = read_seed_log(tmp_path / "run" / LOG_NAME)
    assert {key: log.header["es"][key] for key in settings if key != "max_steps"} == {
        "anchor_decay": 0.5,
        "sigma_decay": 0.9,
        "prompt_groups": 2,
    }
    cli_replay(tiny_model_dir, tmp_path / "run" / LOG_NAME, tmp_path / "replayed")
    assert_same_saved_weights(tmp_path / "run", tmp_path / "replayed")


@pytest.mark.parametrize("perturbation", ["full", "low_rank"])
def test_a_run_through_p_grad_replays_in_place_to_the_same_weights(
    tiny_model_dir, tmp_path, perturbation, monkeypatch
):
    # Replay applies plain SGD from the seeds whichever way the run stepped: the two are bit-identical.
    trainer, _ = train_run(tiny_model_dir, tmp_path / "run", perturbation, inplace_update=False)
    assert not trainer._inplace_update
    from trl_es.core import InPlaceSpace, LowRankSpace

    applied = []
    for cls in (InPlaceSpace, LowRankSpace):
        original = cls.apply_update
        monkeypatch.setattr(cls, "apply_update", lambda self, *a, _f=original: applied.append(a[0]) or _f(self, *a))
    model, _ = replay(tiny_model_dir, str(tmp_path / "run" / LOG_NAME))
    assert applied == [0, 1]
    model.save_pretrained(tmp_path / "replayed")
    assert_same_saved_weights(tmp_path / "run", tmp_path / "replayed")


def test_noise_chunk_is_recorded_and_a_log_from_before_chunks_replays_with_whole_tensor_noise(
    tiny_model_dir, tmp_path, monkeypatch
):
    import trl_es.search
    from trl_es.seed_replay import WHOLE_TENSOR_NOISE

    # Chunks of 100 elements: the tiny model's matrices span several, so the chunk size decides their noise.
    monkeypatch.setattr(trl_es.search, "NOISE_CHUNK", 100)
    train_run(tiny_model_dir, tmp_path / "chunked")
    assert read_seed_log(tmp_path / "chunked" / LOG_NAME).header["es"]["noise_chunk"] == 100
    monkeypatch.setattr(trl_es.search, "NOISE_CHUNK", 2**20)  # replay must take the chunk size from the log
    model, _ = replay(tiny_model_dir, str(tmp_path / "chunked" / LOG_NAME))
    model.save_pretrained(tmp_path / "chunked-replayed")
    assert_same_saved_weights(tmp_path / "chunked", tmp_path / "chunked-replayed")

    # A run of before chunks drew each tensor's noise in one piece, and its log has no noise_chunk.
    monkeypatch.setattr(trl_es.search, "NOISE_CHUNK", WHOLE_TENSOR_NOISE)
    train_run(tiny_model_dir, tmp_path / "old")
    path = tmp_path / "old" / LOG_NAME
    header, *records = path.read_text().splitlines()
    header = json.loads(header)
    del header["es"]["noise_chunk"]
    path.write_text("\n".join([json.dumps(header), *records]) + "\n")
    monkeypatch.setattr(trl_es.search, "NOISE_CHUNK", 100)
    model, _ = replay(tiny_model_dir, str(path))
    model.save_pretrained(tmp_path / "old-replayed")
    assert_same_saved_weights(tmp_path / "old", tmp_path / "old-replayed")
    chunked, old = saved_weights(tmp_path / "chunked"), saved_weights(tmp_path / "old")
    assert any(not torch.equal(chunked[name], old[name]) for name in old), "the chunk size changed no noise"


@pytest.mark.parametrize("perturbation", ["full", "low_rank"])
def test_a_philox_noise_run_is_recorded_as_such_and_replays_bit_exactly(tiny_model_dir, tmp_path, perturbation):
    trainer, changed = train_run(tiny_model_dir, tmp_path / "philox", perturbation, noise_generator="philox")
    assert changed and trainer.perturbation_space.noise.counter_based
    log = read_seed_log(tmp_path / "philox" / LOG_NAME)
    assert log.header["es"]["noise_generator"] == "philox"
    cli_replay(tiny_model_dir, tmp_path / "philox" / LOG_NAME, tmp_path / "replayed")
    assert_same_saved_weights(tmp_path / "philox", tmp_path / "replayed")
    # the same run with the torch generator is another run: other noise, other weights
    train_run(tiny_model_dir, tmp_path / "torch", perturbation)
    philox_weights, torch_weights = saved_weights(tmp_path / "philox"), saved_weights(tmp_path / "torch")
    assert any(not torch.equal(philox_weights[name], torch_weights[name]) for name in torch_weights)
    # a log written before the setting existed replays with the torch generator
    path = tmp_path / "torch" / LOG_NAME
    header, *records = path.read_text().splitlines()
    header = json.loads(header)
    assert header["es"].pop("noise_generator") == "torch"
    path.write_text("\n".join([json.dumps(header), *records]) + "\n")
    cli_replay(tiny_model_dir, path, tmp_path / "torch-replayed")
    assert_same_saved_weights(tmp_path / "torch", tmp_path / "torch-replayed")


def test_replay_clips_like_the_trainer(tiny_model_dir, tmp_path):
    # The tiny run's pseudo-gradient norm is in the hundreds: max_grad_norm=1 clips every step.
    train_run(tiny_model_dir, tmp_path / "run", max_grad_norm=1.0)
    model, _ = replay(tiny_model_dir, str(tmp_path / "run" / LOG_NAME))
    model.save_pretrained(tmp_path / "replayed")
    assert_same_saved_weights(tmp_path / "run", tmp_path / "replayed")


def test_resumed_run_continues_the_log_and_checkpoints_replay_to_themselves(tiny_model_dir, tmp_path):
    first, _ = train_run(
        tiny_model_dir, tmp_path / "first", optim="adamw_torch", save_strategy="steps", save_steps=2, max_steps=2
    )
    checkpoint = tmp_path / "first" / "checkpoint-2"
    assert [r.step for r in read_seed_log(checkpoint / LOG_NAME).records] == [0, 1]
    cli_replay(tiny_model_dir, checkpoint / LOG_NAME, tmp_path / "replayed-checkpoint")
    assert_same_saved_weights(checkpoint, tmp_path / "replayed-checkpoint")

    resumed, _ = train_run(
        tiny_model_dir,
        tmp_path / "resumed",
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=2,
        max_steps=4,
        resume_from_checkpoint=str(checkpoint),
    )
    assert resumed.state.global_step == 4
    log = read_seed_log(tmp_path / "resumed" / LOG_NAME)
    assert [r.step for r in log.records] == [0, 1, 2, 3]
    assert log.header == read_seed_log(checkpoint / LOG_NAME).header  # the base hash comes from the first part
    cli_replay(tiny_model_dir, tmp_path / "resumed" / LOG_NAME, tmp_path / "replayed")
    assert_same_saved_weights(tmp_path / "resumed", tmp_path / "replayed")


@pytest.mark.parametrize("sigma_decay", [1.0, 0.5])
def test_a_log_written_before_a_setting_existed_is_continued_only_at_its_replay_default(
    tiny_model_dir, tmp_path, caplog, sigma_decay
):
    # An older trl_es wrote no sigma_decay (replay reads 1.0 for it). Resumed at 1.0 the old log is continued, header
    # and all; resumed at 0.5 it cannot be, since replaying it would decay nothing: the resumed run writes no log.
    settings = dict(save_strategy="steps", save_steps=2, sigma_decay=sigma_decay)
    train_run(tiny_model_dir, tmp_path / "first", max_steps=2, **settings)
    checkpoint_log = tmp_path / "first" / "checkpoint-2" / LOG_NAME
    header, *records = checkpoint_log.read_text().splitlines()
    header = json.loads(header)
    assert header["es"].pop("sigma_decay") == sigma_decay
    checkpoint_log.write_text("\n".join([json.dumps(header), *records]) + "\n")

    with caplog.at_level(logging.WARNING, logger="trl_es.seed_log"):
        train_run(
            tiny_model_dir,
            tmp_path / "resumed",
            max_steps=4,
            resume_from_checkpoint=str(checkpoint_log.parent),
            **settings,
        )
    if sigma_decay == 1.0:
        log = read_seed_log(tmp_path / "resumed" / LOG_NAME)
        assert [r.step for r in log.records] == [0, 1, 2, 3] and "sigma_decay" not in log.header["es"]
        assert "No seed log" not in caplog.text
        cli_replay(tiny_model_dir, tmp_path / "resumed" / LOG_NAME, tmp_path / "replayed")
        assert_same_saved_weights(tmp_path / "resumed", tmp_path / "replayed")
    else:
        assert "No seed log for this run: its ['es'] differ" in caplog.text
        assert not (tmp_path / "resumed" / LOG_NAME).exists()


# sgd: the in-place update, which must apply nothing on the skipped step and log a zero gradient norm
@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_a_step_without_signal_is_logged_as_skipped_and_replays(tiny_model_dir, tmp_path, optim):
    def none_on_the_first_step(completions, trainer_state, **kwargs):
        return [None if trainer_state.global_step == 0 else float(len(c)) for c in completions]

    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=none_on_the_first_step,
        args=es_config(tmp_path / "run", optim=optim, temperature=1.0, seed=3, max_steps=2),
        train_dataset=arithmetic_dataset("train", size=16),
    )
    trainer.train()
    assert trainer._inplace_update == (optim == "sgd")
    grad_norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    assert grad_norms[0] == 0.0 and grad_norms[1] > 0
    trainer.save_model(str(tmp_path / "run"))
    log = read_seed_log(str(tmp_path / "run" / LOG_NAME))
    assert [record.skip for record in log.records] == [True, False]
    cli_replay(tiny_model_dir, tmp_path / "run" / LOG_NAME, tmp_path / "replayed")
    assert_same_saved_weights(tmp_path / "run", tmp_path / "replayed")


def test_seed_log_can_be_turned_off(tiny_model_dir, tmp_path):
    train_run(tiny_model_dir, tmp_path, max_steps=1, seed_log=False)
    assert not (tmp_path / LOG_NAME).exists()


def test_a_kl_penalty_changes_the_fitness_not_the_replay(tiny_model_dir, tmp_path):
    # beta weighs each member's KL into its fitness, with a reference that moves every step: the coefficients the
    # log records already carry it, so replay needs neither the reference nor a forward pass.
    trainer, changed = train_run(
        tiny_model_dir, tmp_path / "run", beta=0.5, sync_ref_model=True, ref_model_sync_steps=1
    )
    assert changed and any("kl" in entry for entry in trainer.state.log_history)
    cli_replay(tiny_model_dir, tmp_path / "run" / LOG_NAME, tmp_path / "replayed")
    assert_same_saved_weights(tmp_path / "run", tmp_path / "replayed")


@pytest.mark.parametrize("perturbation", ["full", "lora"])
@pytest.mark.parametrize("sigma_decay", [1.0, 0.5])
def test_ga_records_the_winners_and_replay_applies_them(tiny_model_dir, tmp_path, perturbation, sigma_decay):
    trainer, changed = train_run(
        tiny_model_dir,
        tmp_path / "run",
        perturbation,
        strategy="ga",
        population_size=6,
        max_steps=3,
        sigma_decay=sigma_decay,
    )
    log = read_seed_log(tmp_path / "run" / LOG_NAME)
    assert all(record.selection and record.coefficients is None for record in log.records)
    winners = [(record.step, record.winner) for record in log.records if record.winner is not None]
    assert winners == [tuple(gene) for gene in trainer.strategy.genome] and changed, "no child won: nothing to replay"
    assert all(record.state is None and len(record.line) < 60 for record in log.records)  # no genome copy per step
    cli_replay(tiny_model_dir, tmp_path / "run" / LOG_NAME, tmp_path / "replayed")
    assert_same_saved_weights(tmp_path / "run", tmp_path / "replayed")


@pytest.mark.parametrize("perturbation", ["svd", "lora_svd"])
def test_a_cma_run_logs_its_fitness_not_its_search_state_and_replays_bit_exactly(
    tiny_model_dir, tmp_path, perturbation
):  # noqa: E501
    """CMA-ES (ESSA) sets the weights itself from a search whose state is O(dim^2): each record holds the step's
    fitness instead, and replay tells a search rebuilt from the run's start the same fitness again. lora_svd: the
    singular values of a LoRA adapter's factors (ESSA proper), the adapter's initial weights from the header."""
    peft_config = None
    if perturbation == "lora_svd":
        from peft import LoraConfig

        # lora_B starts at zero, so its singular values would be zero: init it randomly, as an SFT'd adapter is
        peft_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    trainer = ESTrainer(
        tiny_model_dir,
        reward_funcs=length_reward,
        args=es_config(
            tmp_path / "run", perturbation="svd", strategy="cma", population_size=4, max_steps=3, cma_sigma0=0.3,
            svd_fraction=1.0, temperature=1.0, seed=3,
        ),
        train_dataset=arithmetic_dataset("train", size=16),
        peft_config=peft_config,
    )  # fmt: skip
    before = snapshot(trainer.model)
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert trainer.strategy.state_dict()["search"]["arrays"]  # the checkpoint side keeps the state
    log = read_seed_log(tmp_path / "run" / LOG_NAME)
    assert [record.step for record in log.records] == [0, 1, 2]
    for record in log.records:
        assert record.state is None and record.coefficients is None and record.fitness.shape == (4,)
        assert len(record.line) < 120, record.line[:200]  # 4 float32 fitness values, no search state
    cli_replay(tiny_model_dir, tmp_path / "run" / LOG_NAME, tmp_path / "replayed")
    assert_same_saved_weights(tmp_path / "run", tmp_path / "replayed")


# ------------------------------------------------------------------ damaged or foreign logs


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("seed-log-run")
    train_run(tiny_model_dir, path)
    return path


def edited_log(run_dir, tmp_path, edit) -> str:
    """A copy of the run's log with ``edit(header, records)`` applied to its parsed lines."""
    lines = (run_dir / LOG_NAME).read_text().splitlines()
    header, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    edit(header, records)
    path = tmp_path / LOG_NAME
    path.write_text("".join(json.dumps(line) + "\n" for line in [header, *records]))
    return str(path)


def test_a_different_base_model_is_named_with_both_hashes(tiny_model_dir, run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        other.model.norm.weight[0] += (
            1e-3  # one number: not a weight ES evolved under low_rank, still a different base
        )
    other.save_pretrained(tmp_path / "other")
    expected = read_seed_log(run_dir / LOG_NAME).header["base_weights_hash"]
    found = weights_hash(other.named_parameters())
    with pytest.raises(ValueError, match="different base model") as error:
        replay(str(tmp_path / "other"), str(run_dir / LOG_NAME))
    assert expected in str(error.value) and found in str(error.value) and found != expected


def test_a_cut_short_last_record_replays_to_the_last_complete_step(tiny_model_dir, run_dir, tmp_path, caplog):
    text = (run_dir / LOG_NAME).read_text()
    killed = tmp_path / "killed.jsonl"
    killed.write_text(text[: len(text) - 12])  # the run died while writing its last record (step 1)
    complete = tmp_path / "complete.jsonl"
    complete.write_text("".join(line + "\n" for line in text.splitlines()[:2]))  # header + step 0
    with caplog.at_level(logging.WARNING, logger="trl_es.seed_log"):
        model, log = replay(tiny_model_dir, str(killed))
    assert [r.step for r in log.records] == [0]
    assert "replaying up to step 0" in caplog.text and "line 3" in caplog.text
    expected, _ = replay(tiny_model_dir, str(complete))
    for (name, a), b in zip(expected.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_a_garbled_record_before_the_last_is_an_error(run_dir, tmp_path):
    lines = (run_dir / LOG_NAME).read_text().splitlines()
    lines[1] = lines[1][:20] + "#" + lines[1][21:]
    path = tmp_path / LOG_NAME
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 2: .*damaged line before it .* no step can be replayed"):
        read_seed_log(str(path))


def test_an_unknown_log_version_is_an_error(run_dir, tmp_path):
    path = edited_log(run_dir, tmp_path, lambda header, records: header.update(version=99))
    with pytest.raises(ValueError, match="seed log version 99 is unknown; this trl_es reads version 1"):
        read_seed_log(path)


def _drop_coefficients(header, records):
    records[1]["c"] = None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h, r: h["es"].update(strategy="cma_es"), "cannot replay strategy 'cma_es'"),
        (lambda h, r: h["es"].update(perturbation="sparse"), "cannot replay perturbation space 'sparse'"),
        (lambda h, r: h["es"].update(perturbation_restore="subtract"), "perturbation_restore='subtract'"),
        (lambda h, r: h["optimizer"].update({"class": "bitsandbytes.optim.AdamW8bit"}), "cannot replay optimizer"),
        (_drop_coefficients, "step 1 has no coefficients"),
        (lambda h, r: r[0].update(c=None, winner=7), r"line 2: 'winner' must be a member in \[0, 4\) or null, got 7"),
    ],
)
def test_what_replay_cannot_rebuild_is_named(tiny_model_dir, run_dir, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        replay(tiny_model_dir, edited_log(run_dir, tmp_path, edit))


def test_records_are_compact_and_exact(run_dir):
    log = read_seed_log(run_dir / LOG_NAME)
    for record in log.records:
        assert len(record.line) < 100  # population 4: two float32 coefficients
        assert record.coefficients.dtype == torch.float32 and record.coefficients.shape == (2,)
