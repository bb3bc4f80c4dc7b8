"""``opd-fast plot RUN_DIR``: the run's dashboard figure, per-metric files, or the stage timeline."""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.run_dir) / "plots"
    if args.timeline:
        from ..plotting.timeline import load_timeline, parse_steps, plot_timeline, select_steps

        steps = parse_steps(args.steps) if args.steps else None
        chosen = select_steps(load_timeline(args.run_dir), steps)
        first, last = min(i.step for i in chosen), max(i.step for i in chosen)
        out.mkdir(parents=True, exist_ok=True)
        path = out / (f"timeline_step{first}.png" if first == last else f"timeline_steps{first}-{last}.png")
        span = f"step {first}" if first == last else f"steps {first}-{last}"
        result = plot_timeline(chosen, path, f"{Path(args.run_dir).name}, {span}")
        print(f"{span}: {result.summary()}")
        print(f"wrote {path}")
        return 0
    if args.steps:
        raise ValueError("--steps selects the steps of --timeline; add --timeline")
    from ..plotting.dashboard import plot_run

    paths = plot_run(args.run_dir, out, each=args.each)
    print(f"wrote {paths[0]}" + (f" and {len(paths) - 1} per-metric plots to {out}" if args.each else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("plot", help="plot a run: one dashboard figure, per-metric files, or a stage timeline")
    parser.add_argument("run_dir", help="the run directory (holds metrics.jsonl, and timeline.jsonl)")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    parser.add_argument("--each", action="store_true", help="also write one PNG per metric")
    parser.add_argument("--timeline", action="store_true",
                        help="draw a Gantt chart of the stages from RUN_DIR/timeline.jsonl and print the overlap "
                             "efficiency (sum of stage busy time / wall)")
    parser.add_argument("--steps", default=None,
                        help="with --timeline: STEP or FIRST:LAST (inclusive); default the last recorded step")
    parser.set_defaults(func=_run)
