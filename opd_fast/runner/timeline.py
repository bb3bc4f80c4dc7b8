"""Stage intervals: what ran when, on which lane, so overlap can be seen and measured.

Every stage of a step (``sample``, ``rollout``, ``score``, ``learn``, ``optim``) is recorded as one
``Interval`` per micro-batch, tagged with the lane (thread) that ran it. From a step's intervals come the
metrics: ``time/<stage>`` (busy seconds), ``idle/<stage>`` (the step's wall time the stage was not
running) and ``overlap_efficiency`` = sum of busy seconds / wall (1.0 for the serial loop, above 1 when
stages overlap, below 1 when time goes to nothing recorded). With a run directory, every interval is also
a line of ``RUN_DIR/timeline.jsonl``::

    {"step": 3, "stage": "score", "lane": "score-worker", "micro_batch": 1, "start": 4.21, "end": 4.26}

``start`` and ``end`` are seconds since this process started the run (a resumed run restarts at 0);
``micro_batch`` is null for per-step stages. On resume, lines after the checkpoint's step are dropped,
as in ``metrics.jsonl``. Async mode records a step's rollouts while an earlier step learns, so a step's
intervals may begin before the previous step ends, and one step's ``overlap_efficiency`` counts rollout
time spent during earlier steps: there, read the ratio of the sums over a window of steps (every
interval belongs to exactly one step, so that is the lanes' true utilization).

Public API: ``Interval``, ``Timeline``, ``stage_metrics``, ``read_timeline``, ``TIMELINE_FILE``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from .files import read_jsonl, write_atomic

TIMELINE_FILE = "timeline.jsonl"
Stage = Literal["sample", "rollout", "score", "learn", "optim"]
STAGES: tuple[Stage, ...] = ("sample", "rollout", "score", "learn", "optim")
MAIN_LANE = "main"


@dataclass(frozen=True)
class Interval:
    """One stage's run on one lane; times in seconds since the run started."""

    step: int
    stage: Stage
    lane: str
    micro_batch: int | None
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _lane() -> str:
    thread = threading.current_thread()
    return MAIN_LANE if thread is threading.main_thread() else thread.name


class Timeline:
    """Collects intervals from any thread; ``close_step`` hands back (and writes) one step's intervals."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self._lock = threading.Lock()
        self._pending: list[Interval] = []
        self._file: IO[str] | None = None

    def open(self, run_dir: str | Path, start_step: int) -> None:
        """Append to ``RUN_DIR/timeline.jsonl``, first dropping lines after ``start_step`` (resume)."""
        path = Path(run_dir) / TIMELINE_FILE
        kept = [r for r in read_jsonl(path) if r["step"] <= start_step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = path.open("a")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @contextlib.contextmanager
    def stage(self, step: int, stage: Stage, micro_batch: int | None = None) -> Iterator[None]:
        """Record the block as ``stage`` of ``step`` on the calling thread's lane."""
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            interval = Interval(step, stage, _lane(), micro_batch, start - self.origin, end - self.origin)
            with self._lock:
                self._pending.append(interval)

    def close_step(self, step: int) -> list[Interval]:
        """The intervals recorded for ``step`` so far, removed from the pending set and written out."""
        with self._lock:
            mine = [i for i in self._pending if i.step == step]
            self._pending = [i for i in self._pending if i.step != step]
        if self._file is not None and mine:
            self._file.write("".join(json.dumps(dataclasses.asdict(i)) + "\n" for i in mine))
            self._file.flush()
        return mine


def stage_metrics(intervals: list[Interval], wall: float) -> dict[str, float]:
    """``time/<stage>``, ``idle/<stage>`` for every stage, and ``overlap_efficiency``, of one step."""
    busy = dict.fromkeys(STAGES, 0.0)
    for interval in intervals:
        busy[interval.stage] += interval.seconds
    out: dict[str, float] = {f"time/{s}": t for s, t in busy.items()}
    out.update({f"idle/{s}": max(0.0, wall - t) for s, t in busy.items()})
    out["overlap_efficiency"] = sum(busy.values()) / wall if wall > 0 else 0.0
    return out


def read_timeline(run_dir: str | Path) -> list[dict[str, Any]]:
    """The intervals of ``RUN_DIR/timeline.jsonl`` as dicts (the schema in the module docstring)."""
    return read_jsonl(Path(run_dir) / TIMELINE_FILE)
