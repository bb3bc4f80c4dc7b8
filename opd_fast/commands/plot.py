"""``opd-fast plot RUN_DIR [--out DIR]``: PNG curves of every metric in RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from ..runner.metrics import plot_metrics

    paths = plot_metrics(args.run_dir, args.out)
    print(f"wrote {len(paths)} plots to {paths[0].parent}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("plot", help="plot a run's metrics as PNG curves")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    parser.set_defaults(func=_run)
