"""``opd-fast train CONFIG [--set key=value ...] [--resume | --overwrite]``: run on-policy distillation.

Under ``torchrun --nproc-per-node N -m opd_fast.cli train CONFIG`` it runs data parallel (``runner.distributed``).

Exit status: 0 when the run finished, 130 when a signal stopped it (checkpointed; ``--resume``
continues), 130 too on a forced quit (second Ctrl-C), which keeps only the previous checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The CONFIG positional, repeatable ``--set key=value`` overrides and ``--task`` (shared with ``eval``)."""
    parser.add_argument("config", help="TOML run config (see examples/opd_tiny.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--task", default=None, metavar="NAME|module:Class",
                        help="prompts and verifier from a built-in task or a custom task class (module:Class or "
                             "file.py:Class, relative to the current directory; trusted code), replacing the "
                             "config's data.prompts / data.task")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides, plus those ``--task`` stands for."""
    if args.task is None:
        return list(args.set)
    from ..plugins import is_code_spec
    from ..runner.config import resolve_code_spec

    task = resolve_code_spec(args.task, Path.cwd()) if is_code_spec(args.task) else args.task
    return [*args.set, f"data.task={json.dumps(task)}", 'data.prompts=""']


def _run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the run's own progress bar readable
    from ..runner.config import load_config
    from ..runner.distributed import world_from_env
    from ..runner.trainer import train

    config = load_config(args.config, config_overrides(args))
    try:
        summary = train(config, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt as exc:
        from ..runner.checkpoint import latest_checkpoint

        kept = latest_checkpoint(config.run.out_dir)
        print(f"opd-fast: {exc or 'interrupted'}; " + (f"--resume continues from {kept}" if kept else
              "no checkpoint was written"), file=sys.stderr)
        return 130
    if world_from_env()[1] == 0:  # a torchrun run: one summary, from rank 0
        print(json.dumps(summary, indent=2))
    return 130 if summary["interrupted"] else 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="on-policy distillation of a student into its teacher(s)")
    add_config_args(parser)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the run's latest checkpoint (changed config keys are applied or refused)")
    start.add_argument("--overwrite", action="store_true",
                       help="delete the previous run in run.out_dir (metrics, configs, checkpoints) and start over")
    parser.set_defaults(func=_run)
