"""Fingerprints of short ES runs, one per update path, to show that a refactor changed no number.

    python benchmarks/trajectory_fingerprint.py --json after.json                 # this checkout
    git worktree add /tmp/before <commit> && cd /tmp/before && PYTHONPATH=. python /path/to/trajectory_fingerprint.py \
        --json before.json                                                         # the code before the refactor
    python benchmarks/trajectory_fingerprint.py --compare before.json after.json   # equal: exit 0

Each case trains the shipped 0.6M policy for a few ES steps on the arithmetic task through one of the update paths
(plain SGD applied in place from the seeds; an optimizer through ``t.grad`` with the anchor's pull and clipping; the
low-rank and LoRA spaces; the genetic algorithm's selection with an annealed sigma; CMA-ES over singular values) and
records the logged rewards and a sha256 of every weight's bytes afterwards. The script uses only the public API
(``ESConfig``, ``ESTrainer``), so the same file runs against the code before and after a change. Bit-identical
fingerprints hold on one CPU kind and torch build (float results differ between them): compare runs made on the same
machine.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CASES = {
    "gaussian_full_sgd_in_place": {"optim": "sgd", "learning_rate": 2e-3},
    "gaussian_full_adamw_anchor_clip": {
        "optim": "adamw_torch",
        "learning_rate": 1e-3,
        "anchor_decay": 0.1,
        "max_grad_norm": 0.5,
    },
    "gaussian_sigma_decay": {"optim": "sgd", "learning_rate": 2e-3, "sigma_decay": 0.8},
    "gaussian_low_rank": {"perturbation": "low_rank", "perturbation_rank": 2, "optim": "sgd", "learning_rate": 2e-3},
    "gaussian_lora": {"perturbation": "lora", "optim": "sgd", "learning_rate": 2e-2},
    "ga_sigma_decay": {"strategy": "ga", "sigma_decay": 0.9},
    "cma_svd": {"strategy": "cma", "perturbation": "svd", "svd_fraction": 0.25, "cma_sigma0": 0.05},
}


def run_case(name: str, settings: dict, steps: int) -> dict:
    import torch
    from peft import LoraConfig

    from trl_es import ESConfig, ESTrainer
    from trl_es.tasks import ARITHMETIC_POLICY_DIR, arithmetic_accuracy, arithmetic_dataset

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as output_dir:
        args = ESConfig(
            output_dir=output_dir,
            report_to="none",
            bf16=False,
            max_steps=steps,
            per_device_train_batch_size=16,
            population_size=8,
            sigma=0.01,
            temperature=0.0,
            max_completion_length=4,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=7,
            **settings,
        )
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if name == "gaussian_lora" else None
        trainer = ESTrainer(
            str(ARITHMETIC_POLICY_DIR),
            reward_funcs=arithmetic_accuracy,
            args=args,
            train_dataset=arithmetic_dataset("train", size=16 * steps),
            peft_config=lora,
        )
        trainer.train()
        digest = hashlib.sha256()
        for key, tensor in sorted(trainer.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
        return {"rewards": rewards, "weights_sha256": digest.hexdigest()}


def compare(before_path: str, after_path: str) -> int:
    before, after = (json.load(open(path)) for path in (before_path, after_path))
    if before["machine"] != after["machine"]:
        print(f"warning: recorded on different machines ({before['machine']} vs {after['machine']})")
    differing = 0
    for name in sorted(set(before["cases"]) | set(after["cases"])):
        one, two = before["cases"].get(name), after["cases"].get(name)
        same = one == two
        differing += not same
        print(f"{'same     ' if same else 'DIFFERENT'} {name}" + ("" if same else f": {one} vs {two}"))
    return 1 if differing else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the fingerprints here")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two fingerprint files")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    result = {
        "machine": {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads()},
        "python": platform.python_version(),
        "steps": args.steps,
        "cases": {},
    }
    for name in args.cases:
        result["cases"][name] = run_case(name, CASES[name], args.steps)
        print(name, json.dumps(result["cases"][name]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
