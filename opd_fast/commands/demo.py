"""``opd-fast demo``: the README's main command (two specialists consolidated into one student by on-policy
distillation, against off-policy baselines, on the shipped ``column_add`` and ``pair_sum`` tasks)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path


def _arms(text: str) -> list[str]:
    return [a for a in text.split(",") if a]


def _run(args: argparse.Namespace) -> int:
    from ..demo.arms import DEFAULT_ARMS, WEAK_ARMS
    from ..demo.profiles import PROFILES
    from ..demo.report import merge_results, report_text
    from ..demo.run import run_demo

    profile = PROFILES["quick" if args.quick else "default"]
    if args.own_starts:
        profile = replace(profile, shared_start=False)
    out = Path(args.out or f"runs/demo-{profile.name}")
    if args.merge:
        print(report_text(merge_results([Path(d) for d in args.merge], out), markdown=False))
        return 0
    arms = _arms(args.arms) if args.arms is not None else list(DEFAULT_ARMS)
    weak_arms = _arms(args.weak_arms) if args.weak_arms is not None else list(WEAK_ARMS)
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or profile.seeds)))
    jobs = args.jobs if args.jobs is not None else os.cpu_count() or 1
    run_demo(profile, seeds, arms, out, Path(args.cache), weak_arms=weak_arms, retrain=args.retrain, jobs=jobs)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="consolidate two specialist teachers into one student: on-policy distillation vs off-policy baselines",
        description="Two specialist teachers (column_add, pair_sum) and the student starts ship with the "
        "package (--retrain trains every model from scratch); every arm (SFT, supervised KD, SeqKD, on-policy "
        "reverse KL and JSD) trains the start over both domains at equal budget, each row routed to its domain's "
        "teacher; then a weaker student with the off-policy arms, plain and teacher-corrected on-policy reverse "
        "KL. Three seeds by default, each from seed 0's start (--own-starts trains one per seed). Prints and "
        "writes per-domain tables with standard errors (JSON/Markdown) and one PNG per domain.",
    )
    demo.add_argument("--quick", action="store_true", help="CI smoke profile: same code path, far fewer steps")
    demo.add_argument("--seeds", type=int, default=None,
                      help="number of seeds (default: 3; the quick profile 1); tables show mean ± standard error")
    demo.add_argument("--own-starts", action="store_true",
                      help="train an initial student per seed instead of every seed starting from seed 0's (shipped) "
                           "start; each takes thousands of SFT steps")
    demo.add_argument("--first-seed", type=int, default=0, help="seeds run are FIRST_SEED .. FIRST_SEED+SEEDS-1")
    demo.add_argument("--out", default=None, help="output directory (default runs/demo-<profile>)")
    demo.add_argument("--cache", default="runs/demo-cache", help="where prepared teachers/students are cached")
    demo.add_argument("--retrain", action="store_true",
                      help="train the teachers and starts from scratch instead of using the shipped/cached ones")
    demo.add_argument("--arms", default=None, help="comma-separated arms of the student (default: "
                      "sft,supervised_kd,seqkd,on_policy_rkl,on_policy_jsd)")
    demo.add_argument("--weak-arms", default=None, help="comma-separated arms of the weak student (default: "
                      "sft,supervised_kd,seqkd,on_policy_rkl,corrected_rkl; '' skips the weak student)")
    demo.add_argument("--jobs", type=int, default=None,
                      help="worker processes for the (seed, student) runs (default: one per CPU core)")
    demo.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                      help="instead of training, merge the results of earlier runs (e.g. one per seed) into --out")
    demo.set_defaults(func=_run)
