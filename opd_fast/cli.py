"""The ``opd-fast`` command line. Subcommands register themselves in ``COMMANDS``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo_minimal import run_minimal_demo

    return run_minimal_demo(steps=args.steps)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd-fast", description="Fast on-policy distillation of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the on-policy distillation demo on the shipped tiny task")
    demo.add_argument("--steps", type=int, default=200)
    demo.set_defaults(func=_demo)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
