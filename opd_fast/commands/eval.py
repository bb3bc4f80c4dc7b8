"""``opd-fast eval CONFIG [--checkpoint DIR] [--set key=value ...]``: accuracy and reverse KL."""

from __future__ import annotations

import argparse
import json

from .train import add_config_args, config_overrides


def _run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the run's own progress bar readable
    from ..runner.checkpoint import find_checkpoint
    from ..runner.config import load_config
    from ..runner.evaluate import evaluate_run

    config = load_config(args.config, config_overrides(args))
    checkpoint = None if args.checkpoint is None else find_checkpoint(config.run.out_dir, args.checkpoint)
    print(json.dumps(evaluate_run(config, checkpoint), indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="task accuracy (greedy, sampled) and reverse KL to the teacher(s)")
    add_config_args(parser)
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to evaluate: 'latest', a checkpoint name or directory "
                             "(default: the config's student)")
    parser.set_defaults(func=_run)
