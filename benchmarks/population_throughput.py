"""How close does a low-rank ES step get to plain batched generation, and how much faster is it than full ES?

Measures in one run, greedy, N members x P prompts x T new tokens (every row forced to exactly T tokens):

  (a) plain     one batched generate of the N*P rows with the unperturbed weights: the physical limit, since an
                ES step must at least generate its rows
  (b) low_rank  one ES step in the low-rank space: one batched generate of all rows with every member's rank-r
                term + the update (factors regenerated from seeds)
  (c) full      one sequential full-parameter ES step: per member perturb in place, generate its P rows, restore;
                then the update

Rewards are left out (they cost the same in every variant). Each variant runs ``--repeats`` times, interleaved,
and the median is reported. Prints a table; ``--json OUT`` writes the ratios: ``low_rank_vs_plain`` (throughput
of b / a) and ``low_rank_vs_sequential`` (time of c / b) for the quickstart model at top level and for a
~25M-parameter model of the same family under ``larger``.

    python benchmarks/population_throughput.py --json outputs/population_throughput.json
"""

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_es.core import InPlaceSpace, LowRankSpace, MemberNoise, pseudo_gradient_coefficients
from trl_es.tasks import ARITHMETIC_POLICY_DIR, arithmetic_dataset
from trl_es.tasks.build_policy import build_model, build_tokenizer


def linears(model):
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def generate(model, inputs, new_tokens, pad_id):
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )


def measure(model, tokenizer, members, prompts_per_member, new_tokens, rank, repeats):
    tokenizer.padding_side = "left"
    prompts = list(arithmetic_dataset("train", size=prompts_per_member)["prompt"])
    one = tokenizer(prompts, return_tensors="pt", padding=True)
    everyone = tokenizer(prompts * members, return_tensors="pt", padding=True)
    noise = MemberNoise(0, members)
    fitness = torch.linspace(-0.5, 0.5, members)
    low_rank = LowRankSpace(linears(model), noise, sigma=1e-3, rank=rank)
    full = InPlaceSpace([(n, p) for n, p in model.named_parameters()], noise, sigma=1e-3)
    pad = tokenizer.pad_token_id

    def plain():
        generate(model, everyone, new_tokens, pad)

    breakdown = {"factors_and_patch": [], "generate": [], "update": []}

    def low_rank_step():
        start = time.perf_counter()
        with low_rank.perturbed(0, list(range(members))):
            patched = time.perf_counter()
            generate(model, everyone, new_tokens, pad)
            generated = time.perf_counter()
        low_rank.write_gradients(0, pseudo_gradient_coefficients(fitness, low_rank.noise, low_rank.sigma))
        breakdown["factors_and_patch"].append(patched - start)
        breakdown["generate"].append(generated - patched)
        breakdown["update"].append(time.perf_counter() - generated)

    def full_step():
        for member in range(members):
            with full.perturbed(0, [member]):
                generate(model, one, new_tokens, pad)
        full.write_gradients(0, pseudo_gradient_coefficients(fitness, full.noise, full.sigma))

    variants = {"plain": plain, "low_rank": low_rank_step, "full_sequential": full_step}
    times = {name: [] for name in variants}
    with torch.no_grad():
        plain()  # warm-up (allocator, kernels)
        for _ in range(repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = members * prompts_per_member
    factor_numbers = sum(rank * (m.in_features + m.out_features) for _, m in low_rank.named_linears)
    return {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "members": members,
        "prompts_per_member": prompts_per_member,
        "new_tokens": new_tokens,
        "rank": rank,
        "seconds": median,
        "tokens_per_second": {name: rows * new_tokens / t for name, t in median.items()},
        "low_rank_vs_plain": median["plain"] / median["low_rank"],
        "low_rank_vs_sequential": median["full_sequential"] / median["low_rank"],
        "sequential_vs_plain_ceiling": median["full_sequential"] / median["plain"],
        "low_rank_breakdown_s": {name: statistics.median(values) for name, values in breakdown.items()},
        "low_rank_factor_bytes_per_member": factor_numbers * 4,
        "full_noise_bytes_per_member": sum(p.numel() for p in model.parameters()) * 4,
    }


def report(title, result):
    print(
        f"\n{title}: {result['num_parameters'] / 1e6:.2f}M parameters, N={result['members']}, "
        f"P={result['prompts_per_member']}, T={result['new_tokens']}, rank={result['rank']}"
    )
    print(f"{'variant':<18}{'median s':>10}{'tokens/s':>12}")
    for name, seconds in result["seconds"].items():
        print(f"{name:<18}{seconds:>10.3f}{result['tokens_per_second'][name]:>12.0f}")
    print(f"low_rank_vs_plain      {result['low_rank_vs_plain']:.3f}   (goal >= 0.9)")
    print(
        f"low_rank_vs_sequential {result['low_rank_vs_sequential']:.2f}x  "
        f"(ceiling sequential/plain = {result['sequential_vs_plain_ceiling']:.2f}x)"
    )
    print(
        f"memory per member: low-rank factors {result['low_rank_factor_bytes_per_member'] / 1024:.1f} KiB "
        f"(fp32, regenerated each step) vs a full noise tensor {result['full_noise_bytes_per_member'] / 2**20:.1f} MiB"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--members", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_larger", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(ARITHMETIC_POLICY_DIR)
    model = AutoModelForCausalLM.from_pretrained(ARITHMETIC_POLICY_DIR, dtype=torch.float32).eval()
    settings = (args.members, args.prompts, args.new_tokens, args.rank, args.repeats)
    result = measure(model, tokenizer, *settings)
    report("quickstart policy", result)
    if not args.skip_larger:
        tokenizer = build_tokenizer()
        larger = build_model(tokenizer, hidden_size=512, num_layers=8, intermediate_size=1408).eval()
        result["larger"] = measure(larger, tokenizer, *settings)
        report("larger model (random init)", result["larger"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
