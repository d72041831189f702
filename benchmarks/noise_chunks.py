"""Chunked noise under ZeRO-3-style sharding: noise work per rank and the noise memory of one ES step.

A tensor's noise is chunks of ``NOISE_CHUNK`` (2^20) flattened elements, each its own seeded draw
(``trl_es/core/noise.py``), so a rank holding a slice of a tensor draws only the chunks its slice overlaps. Before
chunks, every rank drew the whole tensor's noise and cut its slice out: noise work per rank did not shrink with the
number of ranks, and one whole tensor of noise was alive at a time. This script measures both definitions
(``chunked``: chunks of 2^20; ``whole``: one chunk per tensor, i.e. the noise of before) on the shapes of one
transformer block of a Qwen2.5-1.5B-sized model (hidden 1536, intermediate 8960, grouped k/v of 256: 46.3M numbers,
largest matrix 13.8M) in fp32:

  per rank, at world sizes 1, 2 and 4 (ZeRO-3 partitions: rank r holds flattened elements
  [r * ceil(n / world), ...) of every tensor), ranks run one after another in this process with the very code
  ZeRO3Space runs (an InPlaceSpace whose local tensors are shards):
    perturb_restore_s  one member perturbed and restored (restore='subtract': the noise is drawn twice)
    update_s           apply_update with 4 directions (every direction's noise drawn once per chunk)
    drawn_elements     how many noise numbers the rank draws per member (machine-independent)
  noise memory, world 1: the most noise bytes alive at once during perturb / restore / update (every noise tensor a
  space draws is tracked until it is freed), and the peak RSS of one step above the RSS before it (Linux's peak-RSS
  mark reset first), each definition in a process of its own.

    python benchmarks/noise_chunks.py [--json OUT.json] [--repeats 3]

Times are medians of interleaved repeats; the machine's load average is recorded (ratios within one run only).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import weakref

import torch

from trl_es.core import NOISE_CHUNK, InPlaceSpace, MemberNoise


HIDDEN, INTERMEDIATE, KV = 1536, 8960, 256
SHAPES = {
    "q_proj.weight": (HIDDEN, HIDDEN),
    "q_proj.bias": (HIDDEN,),
    "k_proj.weight": (KV, HIDDEN),
    "k_proj.bias": (KV,),
    "v_proj.weight": (KV, HIDDEN),
    "v_proj.bias": (KV,),
    "o_proj.weight": (HIDDEN, HIDDEN),
    "gate_proj.weight": (INTERMEDIATE, HIDDEN),
    "up_proj.weight": (INTERMEDIATE, HIDDEN),
    "down_proj.weight": (HIDDEN, INTERMEDIATE),
    "input_layernorm.weight": (HIDDEN,),
    "post_attention_layernorm.weight": (HIDDEN,),
}
WORLDS = (1, 2, 4)
DEFINITIONS = {"chunked": NOISE_CHUNK, "whole": max(math.prod(shape) for shape in SHAPES.values())}
DIRECTIONS = 4  # population 8, antithetic


class ShardSpace(InPlaceSpace):
    """ZeRO3Space's view without DeepSpeed: each parameter is this rank's flat shard of a tensor of ``full_shape``."""

    def __init__(self, shards, noise, rank, world):
        super().__init__([(name, shard) for name, shard, _ in shards], noise, restore="subtract")
        self.full_shapes = {id(shard): shape for _, shard, shape in shards}
        self.rank, self.world = rank, world

    def _full_shape(self, param):
        return self.full_shapes[id(param)]

    def _local(self, param):
        numel = math.prod(self._full_shape(param))
        return param, self.rank * -(-numel // self.world)


class NoiseTracker:
    """Wraps a space's ``_draw``: counts the noise numbers drawn and the most noise bytes alive at once."""

    def __init__(self, space):
        self.drawn = 0
        self.alive = 0
        self.peak = 0
        original = space._draw

        def draw(*args, **kwargs):
            eps = original(*args, **kwargs)
            size = eps.untyped_storage().nbytes()  # a partial span keeps its whole chunk alive
            self.drawn += size // 4
            self.alive += size
            self.peak = max(self.peak, self.alive)
            weakref.finalize(eps, self._freed, size)
            return eps

        space._draw = draw

    def _freed(self, size):
        self.alive -= size


def shards_of(rank: int, world: int, generator: torch.Generator):
    shards = []
    for name, shape in SHAPES.items():
        numel = math.prod(shape)
        partition = -(-numel // world)
        length = max(0, min(partition, numel - rank * partition))
        shards.append((name, torch.randn(length, generator=generator), shape))
    return shards


def timings(repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    spaces = {}
    for definition, chunk in DEFINITIONS.items():
        for world in WORLDS:
            for rank in range(world):
                noise = MemberNoise(0, 2 * DIRECTIONS, chunk_size=chunk)
                spaces[definition, world, rank] = ShardSpace(shards_of(rank, world, generator), noise, rank, world)
    coefficients = torch.linspace(-1.0, 1.0, DIRECTIONS)
    perturb, update = {key: [] for key in spaces}, {key: [] for key in spaces}
    drawn = {}
    for _ in range(repeats):
        for key, space in spaces.items():  # interleaved: the machine's noise hits every variant alike
            start = time.perf_counter()
            with space.perturbed(0, [0], 1e-3):
                pass
            perturb[key].append(time.perf_counter() - start)
            start = time.perf_counter()
            space.apply_update(0, coefficients, lr=0.0)  # lr 0: the weights stay, the noise work is the same
            update[key].append(time.perf_counter() - start)
    for key, space in spaces.items():
        tracker = NoiseTracker(space)
        with space.perturbed(1, [0], 1e-3):
            drawn[key] = tracker.drawn
    result = {}
    for definition in DEFINITIONS:
        result[definition] = {}
        for world in WORLDS:
            keys = [(definition, world, rank) for rank in range(world)]
            result[definition][f"world_{world}"] = {
                "perturb_restore_s": [statistics.median(perturb[k]) for k in keys],
                "update_s": [statistics.median(update[k]) for k in keys],
                "drawn_elements": [drawn[k] for k in keys],
            }
    return result


def memory_child(definition: str) -> dict:
    """One step (perturb, restore, update) at world 1 in a fresh process: peak RSS above the weights and the most
    noise bytes alive at once."""
    generator = torch.Generator().manual_seed(0)
    noise = MemberNoise(0, 2 * DIRECTIONS, chunk_size=DEFINITIONS[definition])
    space = ShardSpace(shards_of(0, 1, generator), noise, 0, 1)
    tracker = NoiseTracker(space)
    # Reset the kernel's peak-RSS mark (Linux: "5" > clear_refs), so the step's peak is not hidden by import time's.
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    baseline = _status_kb("VmRSS")
    with space.perturbed(0, [0], 1e-3):
        pass
    space.apply_update(0, torch.linspace(-1.0, 1.0, DIRECTIONS), lr=1e-3)
    peak = _status_kb("VmHWM")
    return {"peak_noise_bytes_alive": tracker.peak, "step_rss_above_weights_mb": (peak - baseline) / 1024}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith(field + ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-child", choices=list(DEFINITIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return
    torch.manual_seed(0)
    load_start = os.getloadavg()
    result = {
        "shapes": {name: list(shape) for name, shape in SHAPES.items()},
        "numbers": sum(math.prod(shape) for shape in SHAPES.values()),
        "chunk_size": DEFINITIONS,
        "threads": torch.get_num_threads(),
        "timing": timings(args.repeats),
        "memory": {},
    }
    for definition in DEFINITIONS:  # one process each: ru_maxrss is a high-water mark
        output = subprocess.run(
            [sys.executable, __file__, "--memory-child", definition], capture_output=True, text=True, check=True
        )
        result["memory"][definition] = json.loads(output.stdout.strip().splitlines()[-1])
    result["load_average"] = {"start": load_start, "end": os.getloadavg()}

    print(
        f"one block of a 1.5B-sized model: {result['numbers'] / 1e6:.1f}M fp32 numbers, noise chunk {NOISE_CHUNK} "
        f"elements, {result['threads']} threads, load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print(f"\n{'noise':<8}{'world':>6}{'slowest rank perturb+restore s':>32}{'update s':>10}{'drawn / member':>16}")
    for definition, worlds in result["timing"].items():
        for world, row in worlds.items():
            print(
                f"{definition:<8}{world.split('_')[1]:>6}{max(row['perturb_restore_s']):>32.3f}"
                f"{max(row['update_s']):>10.3f}{max(row['drawn_elements']) / 1e6:>15.1f}M"
            )
    for definition in DEFINITIONS:
        timing = result["timing"][definition]
        one = max(timing["world_1"]["perturb_restore_s"])
        result["timing"][definition]["perturb_speedup"] = {
            world: one / max(row["perturb_restore_s"]) for world, row in timing.items() if world.startswith("world")
        }
        print(
            f"{definition}: per-rank perturb+restore speed-up over world 1: "
            + ", ".join(f"{w}: {s:.2f}x" for w, s in result["timing"][definition]["perturb_speedup"].items())
        )
    print("\nnoise memory of one step (world 1):")
    for definition, memory in result["memory"].items():
        print(
            f"  {definition:<8} most noise alive at once {memory['peak_noise_bytes_alive'] / 2**20:7.1f} MiB, "
            f"step peak RSS above the weights {memory['step_rss_above_weights_mb']:7.1f} MB"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
