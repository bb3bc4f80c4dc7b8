"""Gantt chart of a run's stages: which lane ran what, when, and how much the stages overlapped.

The runner writes ``RUN_DIR/timeline.jsonl`` (format: ``opd_fast.runner.timeline``), one object per
stage interval. The chart has one row per lane and one colour per stage; the *overlap efficiency* of
the chosen steps is the sum of stage busy time over their wall time: 1.0 for a serial loop, above 1
when stages run concurrently, below 1 when time goes to nothing recorded. Over a window of steps it
is the lanes' true utilization, also in async mode, where a step's rollouts run during earlier steps.

Public API: ``load_timeline``, ``parse_steps``, ``select_steps``, ``overlap``, ``plot_timeline``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from ..runner.files import read_jsonl
from ..runner.timeline import TIMELINE_FILE, Interval
from .palette import stage_colour

_FIELDS = {"step": int, "stage": str, "lane": str, "start": (int, float), "end": (int, float)}


def _interval(raw: object, where: str) -> Interval:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a timeline line must be a JSON object, got {type(raw).__name__}")
    for name, kind in _FIELDS.items():
        if not isinstance(raw.get(name), kind) or isinstance(raw.get(name), bool):
            raise ValueError(f"{where}: field {name!r} missing or not {getattr(kind, '__name__', 'a number')} "
                             f"(got {raw.get(name)!r})")
    micro = raw.get("micro_batch")
    if micro is not None and (not isinstance(micro, int) or isinstance(micro, bool)):
        raise ValueError(f"{where}: field 'micro_batch' must be an int or null, got {micro!r}")
    if raw["end"] < raw["start"]:
        raise ValueError(f"{where}: interval ends ({raw['end']}) before it starts ({raw['start']})")
    return Interval(raw["step"], raw["stage"], raw["lane"], micro, float(raw["start"]), float(raw["end"]))


def load_timeline(run_dir: str | Path) -> list[Interval]:
    """The intervals of ``RUN_DIR/timeline.jsonl``, checked; a missing file or a malformed row is a clear error.

    Read like the metrics log (a torn last line is dropped with a warning), then every row is checked
    against the interval schema, since a plot of half-valid data would mislead.
    """
    path = Path(run_dir) / TIMELINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: this run recorded no stage timeline (runs of opd-fast "
                                f"versions that write {TIMELINE_FILE} have one)")
    out = [_interval(raw, f"{path}, interval {i}") for i, raw in enumerate(read_jsonl(path), 1)]
    if not out:
        raise ValueError(f"{path} has no intervals")
    return out


def parse_steps(text: str) -> tuple[int, int]:
    """``"A"`` or ``"A:B"`` (inclusive) to a step range."""
    first, _, last = text.partition(":")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"--steps must be STEP or FIRST:LAST (inclusive integers), got {text!r}") from None
    if a > b:
        raise ValueError(f"--steps {text!r}: the first step is after the last")
    return a, b


def select_steps(intervals: list[Interval], steps: tuple[int, int] | None) -> list[Interval]:
    """The intervals of steps ``A..B`` (default: the last recorded step, past any warm-up)."""
    recorded = sorted({i.step for i in intervals})
    a, b = steps if steps is not None else (recorded[-1], recorded[-1])
    chosen = [i for i in intervals if a <= i.step <= b]
    if not chosen:
        raise ValueError(f"no timeline intervals in steps {a}..{b}; recorded steps are "
                         f"{recorded[0]}..{recorded[-1]}")
    return chosen


@dataclass(frozen=True)
class Overlap:
    """Busy seconds per stage, the wall time they span, and busy / wall."""

    busy: dict[str, float]
    wall: float

    @property
    def efficiency(self) -> float:
        return sum(self.busy.values()) / self.wall if self.wall > 0 else 0.0

    def summary(self) -> str:
        stages = ", ".join(f"{s} {t:.3f} s" for s, t in self.busy.items())
        return (f"overlap efficiency {self.efficiency:.2f} (stage busy {sum(self.busy.values()):.3f} s / "
                f"wall {self.wall:.3f} s; {stages})")


def overlap(intervals: list[Interval]) -> Overlap:
    busy: dict[str, float] = {}
    for i in intervals:
        busy[i.stage] = busy.get(i.stage, 0.0) + i.seconds
    wall = max(i.end for i in intervals) - min(i.start for i in intervals)
    return Overlap(busy, wall)


def plot_timeline(intervals: list[Interval], path: str | Path, title: str = "") -> Overlap:
    """One row per lane, one bar per interval coloured by stage, dotted lines where steps begin."""
    lanes = list(dict.fromkeys(i.lane for i in sorted(intervals, key=lambda i: i.start)))
    stages = list(dict.fromkeys(i.stage for i in intervals))
    result = overlap(intervals)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.7 * len(lanes)))
    for i in intervals:
        row = lanes.index(i.lane)
        ax.broken_barh([(i.start, i.seconds)], (row - 0.35, 0.7), facecolors=stage_colour(i.stage),
                       edgecolor="black", linewidth=0.4)
        if i.micro_batch is not None:
            ax.text(i.start + i.seconds / 2, row, str(i.micro_batch), ha="center", va="center", fontsize=6)
    for step in sorted({i.step for i in intervals}):
        begin = min(i.start for i in intervals if i.step == step)
        ax.axvline(begin, color="grey", linestyle=":", linewidth=0.8)
        ax.text(begin, len(lanes) - 0.45, f" step {step}", fontsize=7, color="grey", va="bottom")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(-0.6, len(lanes) - 0.1)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started (numbers in bars: micro-batch)")
    ax.legend(handles=[Patch(color=stage_colour(s), label=s) for s in stages], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(f"{title}{' - ' if title else ''}{result.summary()}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return result
