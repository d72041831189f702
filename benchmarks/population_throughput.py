"""How close does a low-rank ES step get to plain batched generation, and how much faster is it than full ES?

Measures in one run, greedy, N members x P prompts x T new tokens (every row forced to exactly T tokens):

  (a) plain     one batched generate of the N*P rows with the unperturbed weights: the physical limit, since an
                ES step must at least generate its rows
  (b) low_rank  one ES step in the low-rank space: one batched generate of all rows with every member's rank-r
                term + the update (factors regenerated from seeds)
  (c) full      one sequential full-parameter ES step: per member perturb in place, generate its P rows, restore;
                then the update

Also, in the same interleaved loop:

  (b') low_rank_torch     (b) with torch ops for the member terms (``kernel="torch"``) instead of the compiled CPU
                          kernel (``trl_es/core/cpu_kernel.py``, the default where it builds): what the kernel buys
       low_rank_shared    (b) on torch ops with ``x B`` computed once per input group (q/k/v, gate/up;
                          ``share_inputs=True``) instead of per layer, to show what sharing the input product buys
  member_pass             one member's generate of ``--full_rows`` (128) rows with plain weights: a generation pass
                          of the ``full`` space at the quickstart's rows per member
  perturb_restore_copy / perturb_restore_copy_alone / perturb_restore_subtract
                          entering and leaving ``full``'s ``perturbed`` for one member (noise drawn chunk by chunk,
                          added; restored from the clean copy a population scope keeps, as in the trainer: the
                          whole population timed, per member, the first member's clone included; from a clone
                          taken for this member alone; or by drawing the noise again and subtracting it)
  noise_draw              drawing one member's noise for every parameter, nothing else: the share of the above
                          that is the (serial) CPU random number generator
  update                  the pseudo-gradient of a step (every direction's noise drawn again, weighted, summed)
  ..._philox              (c), the copy and subtract perturb + restore, noise_draw and update on counter-based noise
                          (``MemberNoise(generator="philox")``: one compiled call per chunk on every core, fused with
                          the add into the weights; ``trl_es/core/philox.py``)

and, once after the timed loop, one profiled low-rank generate and one profiled plain generate: the self CPU time of
each op kind and the ops whose time grew most, so the extra time of (b) over (a) can be told apart (the low-rank
ops, and everything else). The torch profiler does not see the compiled kernel's calls, so the milliseconds spent
in them during one more low-rank generate are measured apart (``kernel_ms_per_generate``).

Rewards are left out (they cost the same in every variant). Each variant runs ``--repeats`` times, interleaved,
and the median is reported. Prints a table; ``--json OUT`` writes the ratios: ``low_rank_vs_plain`` (throughput
of b / a), ``low_rank_torch_vs_plain``, ``kernel`` (how the compiled kernel was built, or why not),
``kernel_ms_per_generate``,
``low_rank_vs_sequential`` (time of c / b), ``shared_input_speedup`` (time of b' torch / b' shared),
``perturb_restore_fraction`` (perturb + restore / member_pass: copy, copy_alone, subtract), ``noise_draw_fraction``
(noise_draw / member_pass), ``philox`` (its fractions, and how many times as fast as on torch noise its noise draw,
update and whole full-space step are), ``low_rank_profile_ms`` for the
quickstart model at top level and for a ~25M-parameter model of the same family under ``larger``; and
``load_average`` (start, end) of the run.

    python benchmarks/population_throughput.py --json outputs/population_throughput.json
    python benchmarks/population_throughput.py --model builtin:smollm2-135m-instruct --skip_larger   # a real model

``--model`` (a local folder or a ``builtin:`` name) measures that model in place of the quickstart policy (prompts:
the embedded task's plain text, without a chat template).
"""

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's root: benchmarks.build_policy

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from benchmarks.build_policy import build_model, build_tokenizer  # noqa: E402
from trl_es.builtin_models import resolve_model  # noqa: E402
from trl_es.core import (  # noqa: E402
    InPlaceSpace,
    LowRankSpace,
    MemberNoise,
    cpu_kernel,
    philox,
    pseudo_gradient_coefficients,
)
from trl_es.tasks import ARITHMETIC_POLICY_DIR, arithmetic_dataset  # noqa: E402


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


# Profiled op names, grouped: the low-rank member terms, the base Linear GEMMs, and everything else.
LOW_RANK_OPS = (
    "aten::bmm", "aten::addcmul", "aten::addcmul_", "aten::baddbmm", "aten::baddbmm_", "aten::slice", "aten::reshape",
    "aten::_unsafe_view",
)  # fmt: skip
LINEAR_OPS = ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::t", "aten::transpose")


def profile_ms(run, times: int = 3) -> dict:
    """Self CPU milliseconds of a call of ``run`` (per op, the median of ``times`` profiled calls: one is noisy), by op
    kind (low-rank terms, base GEMMs, the rest) and by op."""
    runs = []
    for _ in range(times):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        counts = collections.Counter()
        for event in prof.key_averages():
            counts[event.key] += event.self_cpu_time_total / 1000
        runs.append(counts)
    by_op = {op: statistics.median(counts.get(op, 0.0) for counts in runs) for op in set().union(*runs)}
    kinds = collections.Counter()
    for op, ms in by_op.items():
        kinds["low_rank_ops" if op in LOW_RANK_OPS else "linear_ops" if op in LINEAR_OPS else "other"] += ms
    return {"total": sum(by_op.values()), **kinds, "by_op": dict(by_op)}


class PopulationStep:
    """The rows, noise and spaces of one ES population step on one model, and the three ways to run it that every
    throughput measurement times (also ``benchmarks/gpu_check.py``): ``plain``, ``low_rank_step``, ``full_step``
    (greedy, N members x P prompts, T new tokens forced). Inputs go to the model's device, where the spaces draw
    their noise too."""

    def __init__(self, model, tokenizer, members, prompts_per_member, new_tokens, rank, sigma=1e-3):
        self.model, self.members, self.new_tokens = model, members, new_tokens
        self.pad = tokenizer.pad_token_id
        tokenizer.padding_side = "left"
        prompts = list(arithmetic_dataset("train", size=prompts_per_member)["prompt"])
        self.one = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        self.everyone = tokenizer(prompts * members, return_tensors="pt", padding=True).to(model.device)
        self.noise, self.sigma = MemberNoise(0, members), sigma
        self.fitness = torch.linspace(-0.5, 0.5, members)
        self.low_rank = LowRankSpace(linears(model), self.noise, rank=rank)
        self.full = InPlaceSpace(list(model.named_parameters()), self.noise)

    def plain(self):
        generate(self.model, self.everyone, self.new_tokens, self.pad)

    def low_rank_step(self, space=None, breakdown=None):
        """One batched generate of every member's rows with its rank-r term, then the update; ``breakdown`` (if
        given) collects the seconds of each part."""
        space = space or self.low_rank
        start = time.perf_counter()
        with space.perturbed(0, list(range(self.members)), self.sigma):
            patched = time.perf_counter()
            generate(self.model, self.everyone, self.new_tokens, self.pad)
            generated = time.perf_counter()
        space.write_gradients(0, pseudo_gradient_coefficients(self.fitness, space.noise, self.sigma))
        if breakdown is not None:
            breakdown["factors_and_patch"].append(patched - start)
            breakdown["generate"].append(generated - patched)
            breakdown["update"].append(time.perf_counter() - generated)

    def full_step(self, space=None):
        """Per member: perturb in place, generate its P rows, restore; then the update. The members run inside one
        ``population`` scope, as the trainer's do (one clean copy of the weights for all of them)."""
        space = space or self.full
        with space.population(0):
            for member in range(self.members):
                with space.perturbed(0, [member], self.sigma):
                    generate(self.model, self.one, self.new_tokens, self.pad)
        space.write_gradients(0, pseudo_gradient_coefficients(self.fitness, space.noise, self.sigma))


def kernel_milliseconds(model, step, times: int = 3) -> float:
    """Milliseconds spent inside the compiled member-term calls during one low-rank generate (median of ``times``):
    what the kernel itself costs, apart from the rest of the step."""
    spent, original = [0.0], cpu_kernel.BoundMembers.layer

    def timed_layer(bound, factors, in_features):
        add = original(bound, factors, in_features)

        def timed(x, out):
            start = time.perf_counter()
            add(x, out)
            spent[0] += time.perf_counter() - start

        return timed

    runs = []
    cpu_kernel.BoundMembers.layer = timed_layer
    try:
        with torch.no_grad():
            for _ in range(times):
                spent[0] = 0.0
                with step.low_rank.perturbed(0, list(range(step.members)), step.sigma):
                    generate(model, step.everyone, step.new_tokens, step.pad)
                runs.append(spent[0] * 1e3)
    finally:
        cpu_kernel.BoundMembers.layer = original
    return statistics.median(runs)


def interleaved_times(variants: dict, repeats: int, warm_up=("plain",), synchronize=None) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each variant, interleaved (so a change in the machine's load hits every variant
    alike), after one untimed call of each of ``warm_up`` (allocator, kernels). Each repeat starts one variant later
    in the order (a rotation), so whatever running right after another variant does to a timing (caches, the other
    variant's allocations) falls on every variant alike instead of always on the same one. ``synchronize`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read: GPU kernels run asynchronously."""
    synchronize = synchronize or (lambda: None)
    times = {name: [] for name in variants}
    names = list(variants)
    with torch.no_grad():
        for name in warm_up:
            variants[name]()
        synchronize()
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                variants[name]()
                synchronize()
                times[name].append(time.perf_counter() - start)
    return times


def measure(model, tokenizer, members, prompts_per_member, new_tokens, rank, repeats, full_rows):
    step = PopulationStep(model, tokenizer, members, prompts_per_member, new_tokens, rank)
    member_rows = tokenizer(
        list(arithmetic_dataset("train", size=full_rows)["prompt"]), return_tensors="pt", padding=True
    )
    low_rank, full, pad = step.low_rank, step.full, step.pad
    on_torch_ops = LowRankSpace(linears(model), step.noise, rank=rank, kernel="torch")
    shared = LowRankSpace(linears(model), step.noise, rank=rank, share_inputs=True)
    full_subtract = InPlaceSpace(list(model.named_parameters()), step.noise, restore="subtract")
    # the same spaces on counter-based noise (MemberNoise(generator="philox"): compiled, parallel, fused with the add)
    philox_noise = MemberNoise(0, members, generator="philox")
    full_philox = InPlaceSpace(list(model.named_parameters()), philox_noise)
    full_philox_subtract = InPlaceSpace(list(model.named_parameters()), philox_noise, restore="subtract")
    breakdown = {"factors_and_patch": [], "generate": [], "update": []}

    def noise_draw(space):  # one member's noise for every parameter, drawn chunk by chunk and dropped: the RNG's share
        def run():
            for name, param in space.named_params:
                for span in space.noise.chunk_spans(param.numel()):
                    space.noise.direction_chunk(0, 0, name, param.numel(), span.chunk)

        return run

    def perturb_restore(space):
        def run():
            with space.perturbed(0, [1], step.sigma):
                pass

        return run

    def perturb_restore_population(space):
        # The trainer perturbs a step's members inside one population scope: the first takes the clean copy, the
        # others only add their noise and copy back. Timed for the whole population; reported per member.
        def run():
            with space.population(0):
                for member in range(members):
                    with space.perturbed(0, [member], step.sigma):
                        pass

        return run

    coefficients = pseudo_gradient_coefficients(step.fitness, step.noise, 1e-3)

    def update(space):  # the pseudo-gradient of a step (every direction's noise again), then dropped
        def run():
            space.write_gradients(0, coefficients)
            model.zero_grad(set_to_none=True)

        return run

    variants = {
        "plain": step.plain,
        "low_rank": lambda: step.low_rank_step(breakdown=breakdown),
        "low_rank_torch": lambda: step.low_rank_step(on_torch_ops),
        "low_rank_shared": lambda: step.low_rank_step(shared),
        "full_sequential": step.full_step,
        "member_pass": lambda: generate(model, member_rows, new_tokens, pad),
        "perturb_restore_copy_population": perturb_restore_population(full),
        "perturb_restore_copy_alone": perturb_restore(full),
        "perturb_restore_subtract": perturb_restore(full_subtract),
        "noise_draw": noise_draw(full),
        "update": update(full),
        "full_sequential_philox": lambda: step.full_step(full_philox),
        "perturb_restore_philox_copy_population": perturb_restore_population(full_philox),
        "perturb_restore_philox_subtract": perturb_restore(full_philox_subtract),
        "noise_draw_philox": noise_draw(full_philox),
        "update_philox": update(full_philox),
    }
    times = interleaved_times(variants, repeats)
    for prefix in ("perturb_restore_copy", "perturb_restore_philox_copy"):
        times[prefix] = [seconds / members for seconds in times.pop(f"{prefix}_population")]
    kernel_ms = kernel_milliseconds(model, step) if low_rank.uses_compiled_kernel else None

    def low_rank_generate():
        with low_rank.perturbed(0, list(range(members)), step.sigma):
            generate(model, step.everyone, new_tokens, pad)

    with torch.no_grad():
        profile = {"low_rank": profile_ms(low_rank_generate), "plain": profile_ms(step.plain)}  # after the timing
    ops = set(profile["low_rank"]["by_op"]) | set(profile["plain"]["by_op"])
    growth = {op: profile["low_rank"]["by_op"].get(op, 0.0) - profile["plain"]["by_op"].get(op, 0.0) for op in ops}
    # where the extra time goes: the ops whose self time grew most from plain to low-rank generation
    profile["extra_by_op"] = dict(sorted(growth.items(), key=lambda item: -item[1])[:8])
    for run in ("low_rank", "plain"):
        profile[run]["by_op"] = dict(collections.Counter(profile[run]["by_op"]).most_common(8))
    model.zero_grad(set_to_none=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = members * prompts_per_member
    factor_numbers = sum(rank * (m.in_features + m.out_features) for _, m in low_rank.named_linears)
    generation = ("plain", "low_rank", "low_rank_torch", "low_rank_shared", "full_sequential")
    return {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "members": members,
        "prompts_per_member": prompts_per_member,
        "new_tokens": new_tokens,
        "rank": rank,
        "full_rows": full_rows,
        "seconds": median,
        "tokens_per_second": {name: rows * new_tokens / median[name] for name in generation},
        "low_rank_vs_plain": median["plain"] / median["low_rank"],
        "low_rank_torch_vs_plain": median["plain"] / median["low_rank_torch"],
        "kernel": cpu_kernel.kernel_status()[1] if step.low_rank.uses_compiled_kernel else "torch ops",
        "low_rank_shared_vs_plain": median["plain"] / median["low_rank_shared"],
        "shared_input_speedup": median["low_rank_torch"] / median["low_rank_shared"],
        "low_rank_vs_sequential": median["full_sequential"] / median["low_rank"],
        "sequential_vs_plain_ceiling": median["full_sequential"] / median["plain"],
        "low_rank_breakdown_s": {name: statistics.median(values) for name, values in breakdown.items()},
        "low_rank_profile_ms": profile,
        "kernel_ms_per_generate": kernel_ms,
        "perturb_restore_fraction": {
            mode: median[f"perturb_restore_{mode}"] / median["member_pass"]
            for mode in ("copy", "copy_alone", "subtract")
        },
        "noise_draw_fraction": median["noise_draw"] / median["member_pass"],
        "philox": {  # the same on counter-based noise (noise_generator="philox")
            "kernel": philox.kernel_status()[1] if philox.kernel_status()[0] else "torch ops",
            "perturb_restore_fraction": {
                mode: median[f"perturb_restore_philox_{mode}"] / median["member_pass"] for mode in ("copy", "subtract")
            },
            "noise_draw_fraction": median["noise_draw_philox"] / median["member_pass"],
            "noise_draw_speedup": median["noise_draw"] / median["noise_draw_philox"],
            "update_speedup": median["update"] / median["update_philox"],
            "full_sequential_speedup": median["full_sequential"] / median["full_sequential_philox"],
        },
        "low_rank_factor_bytes_per_member": factor_numbers * 4,
        "full_noise_bytes_per_member": sum(p.numel() for p in model.parameters()) * 4,
    }


def report(title, result):
    print(
        f"\n{title}: {result['num_parameters'] / 1e6:.2f}M parameters, N={result['members']}, "
        f"P={result['prompts_per_member']}, T={result['new_tokens']}, rank={result['rank']}"
    )
    print(f"{'variant':<26}{'median s':>10}{'tokens/s':>12}")
    for name, seconds in result["seconds"].items():
        tokens = result["tokens_per_second"].get(name)
        print(f"{name:<26}{seconds:>10.3f}{'' if tokens is None else round(tokens):>12}")
    print(f"low_rank_vs_plain {result['low_rank_vs_plain']:.3f}   (goal >= 0.95); member terms: {result['kernel']}")
    print(f"  the same on torch ops (kernel='torch'): {result['low_rank_torch_vs_plain']:.3f}")
    if result["kernel_ms_per_generate"] is not None:
        kernel_ms = result["kernel_ms_per_generate"]
        share = kernel_ms / (result["seconds"]["plain"] * 1e3)
        print(f"  time inside the compiled kernel: {kernel_ms:.1f} ms a generate = {share:.3f} of plain")
    print(
        f"x B shared by q/k/v and gate/up (share_inputs=True, torch ops): {result['shared_input_speedup']:.3f}x the "
        f"speed of per layer on torch ops (shared vs plain {result['low_rank_shared_vs_plain']:.3f})"
    )
    print(
        f"low_rank_vs_sequential {result['low_rank_vs_sequential']:.2f}x  "
        f"(ceiling sequential/plain = {result['sequential_vs_plain_ceiling']:.2f}x)"
    )
    breakdown = result["low_rank_breakdown_s"]
    print(
        "low-rank step: "
        + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in breakdown.items())
        + f"; extra generate time over plain {breakdown['generate'] - result['seconds']['plain']:+.3f} s"
    )
    profile = result["low_rank_profile_ms"]
    extra = profile["low_rank"]["total"] - profile["plain"]["total"]
    print(
        f"profiled (self CPU ms, low_rank vs plain): total {profile['low_rank']['total']:.0f} vs "
        f"{profile['plain']['total']:.0f} (+{extra:.0f}); low-rank ops {profile['low_rank']['low_rank_ops']:.0f} vs "
        f"{profile['plain']['low_rank_ops']:.0f}, base GEMMs {profile['low_rank']['linear_ops']:.0f} vs "
        f"{profile['plain']['linear_ops']:.0f}, other {profile['low_rank']['other']:.0f} vs "
        f"{profile['plain']['other']:.0f}"
    )
    print(
        "  ops whose self time grew most (ms): "
        + ", ".join(f"{op} {ms:+.0f}" for op, ms in profile["extra_by_op"].items())
    )
    fraction = result["perturb_restore_fraction"]
    print(
        f"full space perturb + restore / one {result['full_rows']}-row generation pass: copy {fraction['copy']:.3f} "
        f"(a member of a population; one outside it, cloning the weights: {fraction['copy_alone']:.3f}), subtract "
        f"{fraction['subtract']:.3f}   (goal <= 0.1); drawing one member's noise alone "
        f"{result['noise_draw_fraction']:.3f} (the CPU generator is serial: copy restore draws once, subtract twice)"
    )
    on_philox = result["philox"]
    print(
        f"  on philox noise ({on_philox['kernel'].split(' -shared')[0]}): copy "
        f"{on_philox['perturb_restore_fraction']['copy']:.3f}, subtract "
        f"{on_philox['perturb_restore_fraction']['subtract']:.3f}, drawing the noise alone "
        f"{on_philox['noise_draw_fraction']:.3f} ({on_philox['noise_draw_speedup']:.2f}x the torch generator); the "
        f"update {on_philox['update_speedup']:.2f}x and a whole full-space step (sequential) "
        f"{on_philox['full_sequential_speedup']:.2f}x as fast as on torch noise"
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
    parser.add_argument("--full_rows", type=int, default=128, help="rows of one member's generation pass (full)")
    parser.add_argument("--skip_larger", action="store_true")
    parser.add_argument("--model", help="a local model folder or builtin: name instead of the quickstart policy")
    args = parser.parse_args()
    torch.manual_seed(0)
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")

    folder = resolve_model(args.model) if args.model else ARITHMETIC_POLICY_DIR
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"  # a decoder-only batch pads on the left (a no-op for the quickstart tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    settings = (args.members, args.prompts, args.new_tokens, args.rank, args.repeats, args.full_rows)
    result = measure(model, tokenizer, *settings)
    result["model"] = args.model or "builtin:arithmetic-policy"
    report(args.model or "quickstart policy", result)
    if not args.skip_larger:
        tokenizer = build_tokenizer()
        larger = build_model(tokenizer, hidden_size=512, num_layers=8, intermediate_size=1408).eval()
        result["larger"] = measure(larger, tokenizer, *settings)
        report("larger model (random init)", result["larger"])
    result["load_average"] = {"start": load_start, "end": os.getloadavg()}
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in result['load_average']['end'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
