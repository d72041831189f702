"""What a seed log costs and what replaying it saves, measured in one run.

Trains the quickstart recipe (full space, population 32, 128 prompts a step, greedy, SGD with a linear schedule)
for ``--steps`` steps, then replays its ``es_seed_log.jsonl`` onto the base model and checks every saved tensor is
identical. Prints:

  bytes/step     mean size of one step record (newline included), and the header's size
  replay/train   time of the replayed optimizer steps / time of the trained steps (``train_runtime``)
  end to end     replay including loading the base model, hashing it and building the space

    python benchmarks/seed_log_replay.py --steps 10 --json outputs/seed_log_replay.json
"""

import argparse
import json
import os
import tempfile
import time

import torch

from trl_es.recipes import parse_train_args
from trl_es.scripts.train import load_datasets, load_reward_funcs, resolve_model
from trl_es.seed_log import LOG_NAME, read_seed_log
from trl_es.seed_replay import load_base_model, replay_steps
from trl_es.trainer import ESTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None)
    options = parser.parse_args()
    load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as out:
        overrides = f"--max_steps {options.steps} --output_dir {out} --logging_steps 1000 --disable_tqdm true".split()
        script_args, training_args, model_args = parse_train_args(["--config", options.config, *overrides])
        base = resolve_model(model_args.model_name_or_path)
        train_dataset, _ = load_datasets(script_args)
        trainer = ESTrainer(
            base, reward_funcs=load_reward_funcs(script_args), args=training_args, train_dataset=train_dataset
        )
        train_seconds = trainer.train().metrics["train_runtime"]
        trainer.save_model(out)

        path = os.path.join(out, LOG_NAME)
        lines = open(path, "rb").read().splitlines(keepends=True)
        start = time.perf_counter()
        log = read_seed_log(path)
        model = load_base_model(base, log)
        setup_seconds = time.perf_counter() - start
        start = time.perf_counter()
        replay_steps(model, log)
        replay_seconds = time.perf_counter() - start
        trained = dict(trainer.model.named_parameters())
        assert all(torch.equal(p, trained[name]) for name, p in model.named_parameters()), "replay differs"

    result = {
        "steps": options.steps,
        "population_size": training_args.population_size,
        "evolved_parameters": trainer.perturbation_space.num_parameters(),
        "bytes_per_step": sum(len(line) for line in lines[1:]) / options.steps,
        "header_bytes": len(lines[0]),
        "train_seconds": train_seconds,
        "replay_seconds": replay_seconds,
        "replay_setup_seconds": setup_seconds,
        "replay_vs_train": replay_seconds / train_seconds,
        "replay_end_to_end_vs_train": (replay_seconds + setup_seconds) / train_seconds,
        "load_average_at_start": load,
    }
    print(
        f"population {result['population_size']}, {result['evolved_parameters']:,} evolved parameters, "
        f"{options.steps} steps (load average {load:.1f})\n"
        f"  bytes/step    {result['bytes_per_step']:.0f} (header {result['header_bytes']:,} bytes)\n"
        f"  train         {train_seconds:.2f} s\n"
        f"  replay        {replay_seconds:.3f} s steps + {setup_seconds:.2f} s load/hash/build\n"
        f"  replay/train  {result['replay_vs_train']:.4f} (end to end {result['replay_end_to_end_vs_train']:.4f})"
    )
    if options.json:
        os.makedirs(os.path.dirname(options.json) or ".", exist_ok=True)
        with open(options.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
