"""Metrics: one JSONL row per step, sample completions, a progress bar, the trackers (``trackers``).

Rows live in ``RUN_DIR/metrics.jsonl``. Step rows carry ``step`` and scalar fields (loss, per-teacher
and per-domain divergence, entropy, completion length, truncation rate, tokens/s, stage times,
grad norm, lr, skipped steps); evaluation rows carry ``"kind": "eval"``. On resume, rows after the
checkpoint's step are dropped so the file always describes one consistent run; that rewrite goes
through a temporary file and one rename, so a crash leaves the old file or the new one. A torn final
line (what a full disk or a power loss leaves) is dropped with a warning instead of making the run
unreadable; a broken line anywhere else is an error naming the file and line. Every
``metrics.samples_every`` steps a few completions (prompt, completion, reward, mean per-token
divergence) go to ``RUN_DIR/samples.jsonl`` under the same resume rule, and to the trackers as tables.

Public API: ``MetricsLogger``, ``SilentLogger``, ``read_metrics`` (figures: ``opd_fast.plotting.dashboard``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .config import MetricsConfig
from .files import read_jsonl, write_atomic
from .trackers import RunIdentity, SampleRecord, open_trackers

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
PROGRESS_KEYS = ("loss", "completion_len", "tokens_per_s", "lr")


def read_metrics(run_dir: str | Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl`` (or another JSONL log there); a torn last line is dropped with a
    warning."""
    return read_jsonl(Path(run_dir) / name)


def _kept_rows(path: Path, start_step: int) -> list[dict[str, Any]]:
    """Rows of ``path`` up to ``start_step``, rewritten atomically (a resume redoes the later steps)."""
    kept = [r for r in read_metrics(path.parent, path.name) if r.get("step", 0) <= start_step]
    if kept or path.exists():
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


class MetricsLogger:
    """Writes rows (and sample completions) to the run directory and the trackers; shows a tqdm bar from
    ``start_step`` to ``total_steps``."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0,
                 metrics: MetricsConfig | None = None, identity: RunIdentity | None = None) -> None:
        cfg = metrics or MetricsConfig()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        self.kept = _kept_rows(self.path, start_step)
        _kept_rows(run_dir / SAMPLES_FILE, start_step)
        self.file = self.path.open("a")  # creates the file: a run that started has metrics.jsonl
        self.samples_path = run_dir / SAMPLES_FILE
        self.bar = tqdm(total=total_steps, initial=start_step, desc="opd", disable=not cfg.progress, dynamic_ncols=True)
        identity = identity or RunIdentity(run_id=run_dir.name, name=run_dir.name, config={})
        self.trackers = open_trackers(cfg, run_dir, identity)

    def recorded_eval(self, step: int) -> dict[str, float] | None:
        """The evaluation already recorded at ``step`` (a resumed finished run must not evaluate twice)."""
        for row in reversed(self.kept):
            if row.get("kind") == "eval" and row.get("step") == step:
                return {k: v for k, v in row.items() if k not in ("step", "kind")}
        return None

    def log(self, row: dict[str, Any], *, advance: bool = True) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = int(row.get("step", 0))
        prefix = "eval/" if row.get("kind") == "eval" else ""
        values = {prefix + k: float(v) for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        for tracker in self.trackers:
            tracker.scalars(values, step)
        if advance:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in PROGRESS_KEYS if k in row})

    def log_samples(self, records: list[SampleRecord]) -> None:
        """Sample completions: one JSON line each in ``samples.jsonl``, and a table per tracker."""
        if not records:
            return
        with self.samples_path.open("a") as f:
            f.write("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))
        for tracker in self.trackers:
            tracker.samples(records, records[0].step)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        for tracker in self.trackers:
            tracker.close()


class SilentLogger(MetricsLogger):
    """The logger of a data-parallel run's ranks other than 0: logs nothing (rank 0 writes the run's files and
    trackers, with the global values)."""

    def __init__(self) -> None:  # no files, no trackers, no progress bar
        self.kept = []

    def log(self, row: dict[str, Any], *, advance: bool = True) -> None:
        pass

    def log_samples(self, records: list[SampleRecord]) -> None:
        pass

    def close(self) -> None:
        pass

