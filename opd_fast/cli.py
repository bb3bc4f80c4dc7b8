"""The ``opd-fast`` command line.

Each subcommand lives in its own module under ``opd_fast/commands/`` exposing
``register(subparsers)``, which adds a parser whose ``func(args) -> int`` runs it. Modules are
imported lazily by name so that ``opd-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# One entry per module in opd_fast/commands/ (add yours here).
SUBCOMMAND_MODULES: tuple[str, ...] = ("demo", "bench", "train", "eval", "generate", "plot", "kernels")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd-fast", description="Fast on-policy distillation of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"opd_fast.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
