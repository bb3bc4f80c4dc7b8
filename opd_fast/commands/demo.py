"""``opd-fast demo``: the README's main command (on-policy distillation on the shipped ``column_add`` task)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from ..demo.arms import DEFAULT_ARMS
    from ..demo.profiles import PROFILES
    from ..demo.report import merge_results, text_table
    from ..demo.run import run_demo

    profile = PROFILES["quick" if args.quick else "default"]
    out = Path(args.out or f"runs/demo-{profile.name}")
    if args.merge:
        print(text_table(merge_results([Path(d) for d in args.merge], out)))
        return 0
    arms = args.arms.split(",") if args.arms else list(DEFAULT_ARMS)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    run_demo(profile, seeds, arms, out, Path(args.cache))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the on-policy distillation demo on the shipped column_add task",
        description="Train a tiny teacher (cached), a smaller student's shared start per seed (cached), then every "
        "arm (SFT, supervised KD, SeqKD, on-policy forward/reverse KL and JSD) at equal budget; print and write a "
        "table (JSON/Markdown) and a PNG of accuracy against teacher-scored tokens.",
    )
    demo.add_argument("--quick", action="store_true", help="CI smoke profile: same code path, far fewer steps")
    demo.add_argument("--seeds", type=int, default=1, help="number of seeds; the table shows mean ± std")
    demo.add_argument("--first-seed", type=int, default=0, help="seeds run are FIRST_SEED .. FIRST_SEED+SEEDS-1")
    demo.add_argument("--out", default=None, help="output directory (default runs/demo-<profile>)")
    demo.add_argument("--cache", default="runs/demo-cache", help="where prepared teacher/students are cached")
    demo.add_argument("--arms", default=None, help="comma-separated arms (default: all but mixed_rkl)")
    demo.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                      help="instead of training, merge the results of earlier runs (e.g. one per seed) into --out")
    demo.set_defaults(func=_run)
