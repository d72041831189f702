"""``trl-es replay``: rebuild a run's trained weights from the base model and its seed log, without generating.

    trl-es replay --model builtin:arithmetic-policy --seed_log outputs/quickstart/es_seed_log.jsonl \\
        --output_dir outputs/replayed

Writes what ``trainer.save_model`` writes (the full model, or the adapter for a PEFT run) plus the base model's
tokenizer. On the device type and torch build of the run the weights are bit-identical to the trained ones. A
checkpoint's ``es_seed_log.jsonl`` replays to that checkpoint.
"""

import argparse
import logging
import time

from ..builtin_models import resolve_model
from ..seed_replay import replay


logger = logging.getLogger(__name__)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-es replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="The base model the run started from: local path or builtin:.")
    parser.add_argument("--seed_log", required=True, help="The run's es_seed_log.jsonl (or a checkpoint's).")
    parser.add_argument("--output_dir", required=True, help="Where to write the replayed model.")
    parser.add_argument(
        "--device", default=None, help="Device to replay on (default: the device type the run trained on)."
    )
    return parser


def main(argv: list[str]) -> int:
    args = make_parser().parse_args(argv)
    start = time.perf_counter()
    base = resolve_model(args.model)
    model, log = replay(base, args.seed_log, device=args.device)
    model.save_pretrained(args.output_dir)
    _save_tokenizer(base, args.output_dir)
    steps = f"steps 0-{log.next_step - 1}" if log.records else "no step"
    print(
        f"replayed {steps} of {args.seed_log} onto {args.model} in {time.perf_counter() - start:.1f} s "
        f"-> {args.output_dir}"
        + (" (the log's last record was cut short, see the warning)" if log.stopped_early else "")
    )
    return 0


def _save_tokenizer(model_path: str, output_dir: str) -> None:
    """Save the base model's tokenizer next to the weights, as ``save_model`` saves the processing class."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:  # a model folder without a tokenizer: the weights are what matters
        logger.warning("no tokenizer saved: %s has none that loads (%s)", model_path, error)
        return
    tokenizer.save_pretrained(output_dir)
