"""``opd-fast demo``: the README's main command."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from ..demo_minimal import run_minimal_demo

    return run_minimal_demo(steps=args.steps)


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the on-policy distillation demo on the shipped tiny task")
    demo.add_argument("--steps", type=int, default=200)
    demo.set_defaults(func=_run)
