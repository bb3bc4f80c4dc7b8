"""Metrics: one JSONL row per step, a progress bar, TensorBoard when installed.

Rows live in ``RUN_DIR/metrics.jsonl``. Step rows carry ``step`` and scalar fields (loss, per-teacher
and per-domain divergence, entropy, completion length, truncation rate, tokens/s, stage times,
grad norm, lr, skipped steps); evaluation rows carry ``"kind": "eval"``. On resume, rows after the
checkpoint's step are dropped so the file always describes one consistent run; that rewrite goes
through a temporary file and one rename, so a crash leaves the old file or the new one. A torn final
line (what a full disk or a power loss leaves) is dropped with a warning instead of making the run
unreadable; a broken line anywhere else is an error naming the file and line.

Public API: ``MetricsLogger``, ``read_metrics`` (figures: ``opd_fast.plotting.dashboard``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .files import read_jsonl, write_atomic

METRICS_FILE = "metrics.jsonl"
PROGRESS_KEYS = ("loss", "completion_len", "tokens_per_s", "lr")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl``; a torn last line is dropped with a warning."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


class MetricsLogger:
    """Writes rows; shows a tqdm bar from ``start_step`` to ``total_steps``."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, *, progress: bool = True,
                 tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= start_step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))
        self.file = self.path.open("a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="opd", disable=not progress, dynamic_ncols=True)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL + PNG only, and the user is told once
                warnings.warn("metrics.tensorboard is on but the tensorboard package is not installed: metrics go "
                              "to metrics.jsonl only (pip install tensorboard, or set metrics.tensorboard=false)",
                              stacklevel=2)
                self.tb = None

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
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(prefix + key, value, step)
        if advance:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in PROGRESS_KEYS if k in row})

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
