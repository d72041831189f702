"""``trl-es``: the command line, in the style of ``trl grpo --config recipe.yaml``. It only dispatches.

    trl-es train --config recipes/quickstart.yaml [--learning_rate 3e-4 ...]
    trl-es compare --config recipes/quickstart.yaml --output_dir outputs/compare [--seeds 3] [--grid]
    trl-es replay --model BASE --seed_log OUT/es_seed_log.jsonl --output_dir REPLAYED

The recipe format (keys, sections, overrides) is described in ``trl_es/recipes.py``.
"""

import logging
import sys


USAGE = """usage: trl-es <command> [--config recipe.yaml] [--key value ...]

commands:
  train     train a model with ESTrainer (evolution strategies)
  compare   ES against GRPO on the same recipe and budget (writes compare.json / .md / .png)
  replay    rebuild a run's trained weights from its base model and es_seed_log.jsonl (no generation)

Run `trl-es <command> --help` for every option.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    # Commands are imported on demand: `trl-es --help` should not pay for loading torch and transformers.
    if command == "train":
        from .scripts.train import main as train_main

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return train_main(rest)
    if command == "compare":
        from .compare.run import main as compare_main

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return compare_main(rest)
    if command == "replay":
        from .scripts.replay import main as replay_main

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return replay_main(rest)
    print(f"trl-es: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
