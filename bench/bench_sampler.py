"""Cost of the prompt sampler per training step vs pool size, for the ``uniform`` and ``adaptive`` samplers.

    .venv/bin/python bench/bench_sampler.py [--sizes 256 4096 65536 1000000] [--prompts-per-step 64]
                                            [--domains 2] [--steps 50] [--json out.json]

Each case builds a ``PromptSource`` over ``size`` synthetic prompts, gives every prompt feedback first
(the adaptive sampler's worst case: every weight differs from 1, the domain maximum is live), then times
``steps`` steps of ``next_batch`` and of ``update`` (the sampler's whole share of a step) with random
divergences fed back. Prints median and min-max per step, in milliseconds. The cost should stay flat as
the pool grows; absolute numbers are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from opd_fast.runner.data import PromptSource
from opd_fast.tasks import Example


def build(size: int, domains: int, sampler: str, prompts_per_step: int) -> PromptSource:
    pool = [Example(f"prompt {i}", "", f"d{i % domains}") for i in range(size)]
    src = PromptSource(pool, prompts_per_step=prompts_per_step, group_size=1, sampler=sampler, seed=0)
    rng = random.Random(1)
    for lo in range(0, size, 65536):  # feedback for every prompt
        idx = list(range(lo, min(size, lo + 65536)))
        src.update(idx, [rng.random() for _ in idx])
    return src


def time_steps(src: PromptSource, steps: int) -> dict[str, list[float]]:
    rng = random.Random(2)
    times: dict[str, list[float]] = {"next_batch": [], "update": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = src.next_batch()
        t1 = time.perf_counter()
        src.update([p.index for p in batch], [rng.random() for _ in batch])
        t2 = time.perf_counter()
        times["next_batch"].append(t1 - t0)
        times["update"].append(t2 - t1)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536, 262144, 1_000_000])
    parser.add_argument("--prompts-per-step", type=int, default=64)
    parser.add_argument("--domains", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    print("| sampler | prompts | next_batch ms (min-max) | update ms (min-max) |")
    print("|---|---|---|---|")
    for sampler in ("uniform", "adaptive"):
        for size in args.sizes:
            src = build(size, args.domains, sampler, args.prompts_per_step)
            times = time_steps(src, args.steps)
            row = {"sampler": sampler, "prompts": size, "prompts_per_step": args.prompts_per_step}
            cells = []
            for stage, values in times.items():
                ms = [v * 1e3 for v in values]
                row[stage] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}
                cells.append(f"{statistics.median(ms):.3f} ({min(ms):.3f}-{max(ms):.3f})")
            rows.append(row)
            print(f"| {sampler} | {size} | {cells[0]} | {cells[1]} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
