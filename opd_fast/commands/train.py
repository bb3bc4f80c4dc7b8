"""``opd-fast train CONFIG [--set key=value ...] [--resume]``: run on-policy distillation."""

from __future__ import annotations

import argparse
import json


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The CONFIG positional and repeatable ``--set key=value`` overrides (shared with ``eval``)."""
    parser.add_argument("config", help="TOML run config (see examples/opd_tiny.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the run's own progress bar readable
    from ..runner.config import load_config
    from ..runner.trainer import train

    summary = train(load_config(args.config, args.set), resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 130 if summary["interrupted"] else 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="on-policy distillation of a student into its teacher(s)")
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.set_defaults(func=_run)
