"""A run's metrics as one readable figure: grouped panels with titles and units, not one PNG per raw key.

``RUN_DIR/metrics.jsonl`` holds step rows and evaluation rows (``"kind": "eval"``). Each known
metric family has a panel (loss and divergence, throughput, stage times, evaluation accuracy,
learning rate, ...); a metric no panel claims gets a panel of its own, titled from its key, so
new metrics show up without being lost. ``--each`` also writes one file per metric.

Public API: ``plot_run``, ``PANELS``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from ..runner.metrics import METRICS_FILE, read_metrics
from .palette import stage_colour

DASHBOARD_FILE = "dashboard.png"
_COLUMNS = 3
_NOT_PLOTTED = {"step", "tokens", "skipped_steps"}  # the x axis; a running count; a counter shown in the title


@dataclass(frozen=True)
class Panel:
    """One subplot: the metrics whose key ``claims`` accepts, labelled by ``label(key)``."""

    title: str
    unit: str
    claims: Callable[[str], bool]
    label: Callable[[str], str]
    log: bool = False


def _tail(key: str) -> str:
    return key.split("/", 1)[1].replace("/", " ")


def _humanize(key: str) -> str:
    """``divergence/teacher/ta`` -> ``divergence teacher ta``, ``tokens_per_s`` -> ``tokens per s``."""
    return re.sub(r"[_/]+", " ", key).strip()


def _accuracy_label(key: str) -> str:
    mode, _, domain = key.partition("/accuracy")
    return f"{mode}, domain {domain.strip('/')}" if domain.strip("/") else f"{mode} (all)"


PANELS: tuple[Panel, ...] = (
    Panel("Training loss and divergence", "nats / token",
          lambda k: k in ("loss", "eval/reverse_kl") or k.startswith(("divergence/", "eval/reverse_kl/")),
          lambda k: {"loss": "loss", "eval/reverse_kl": "eval reverse KL"}.get(k) or
          ("eval reverse KL, domain " + k.rsplit("/", 1)[1] if k.startswith("eval/") else _tail(k))),
    Panel("Evaluation accuracy", "fraction correct", lambda k: k.startswith("eval/") and "/accuracy" in k,
          lambda k: _accuracy_label(k.removeprefix("eval/"))),
    Panel("Throughput", "generated tokens / s", lambda k: k == "tokens_per_s", lambda k: "tokens per second"),
    Panel("Step and stage times", "seconds / step", lambda k: k == "step_time" or k.startswith("time/"),
          lambda k: "step wall time" if k == "step_time" else _tail(k)),
    Panel("Stage idle time", "seconds / step", lambda k: k.startswith("idle/"), _tail),
    Panel("Overlap efficiency", "stage busy time / wall", lambda k: k == "overlap_efficiency",
          lambda k: "sum of stage busy time / wall"),
    Panel("Learning rate", "lr", lambda k: k == "lr", lambda k: "lr", log=True),
    Panel("Gradient norm", "L2 norm (before clipping)", lambda k: k == "grad_norm", lambda k: "grad norm", log=True),
    Panel("Completion length", "tokens", lambda k: k == "completion_len", lambda k: "mean completion length"),
    Panel("Truncated completions", "fraction", lambda k: k == "truncation_rate", lambda k: "hit max_new_tokens"),
    Panel("Student entropy", "nats / token", lambda k: k == "student_entropy", lambda k: "student entropy"),
    Panel("Sample staleness (async)", "optimizer steps behind", lambda k: k == "async/staleness",
          lambda k: "staleness"),
    Panel("Importance weight (async)", "mean truncated ratio", lambda k: k == "async/importance_weight",
          lambda k: "importance weight"),
    Panel("Dropped samples (async)", "samples, cumulative", lambda k: k == "async/dropped_samples",
          lambda k: "dropped"),
)

Series = dict[str, list[tuple[int, float]]]


def _series(rows: list[dict[str, Any]]) -> Series:
    """Finite numeric values by key (evaluation keys prefixed ``eval/``), as (step, value) points."""
    out: Series = {}
    for row in rows:
        prefix = "eval/" if row.get("kind") == "eval" else ""
        for key, value in row.items():
            if key in _NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out.setdefault(prefix + key, []).append((int(row.get("step", 0)), float(value)))
    return out


def _assign(series: Series) -> list[tuple[Panel, list[str]]]:
    """Panels with the keys each claims (first claim wins), then one panel per unclaimed key."""
    left = sorted(series)
    out = []
    for panel in PANELS:
        keys = [k for k in left if panel.claims(k)]
        if keys:
            out.append((panel, keys))
            left = [k for k in left if k not in keys]
    out += [(Panel(_humanize(k).capitalize(), "", lambda _k, k=k: _k == k, _humanize), [k]) for k in left]
    return out


def _colour(key: str) -> str | None:
    """Stages keep their timeline colours; the step's wall time is black beside them; the rest cycle."""
    if key.startswith(("time/", "idle/")):
        return stage_colour(key.split("/", 1)[1])
    return "black" if key == "step_time" else None


def _draw(ax, panel: Panel, keys: list[str], series: Series) -> None:
    for key in keys:
        pts = series[key]
        is_eval = key.startswith("eval/")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=panel.label(key), color=_colour(key),
                linestyle="--" if is_eval else "-", marker="o" if is_eval or len(pts) < 30 else None, markersize=3)
    if panel.log and all(v > 0 for k in keys for _, v in series[k]):
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(panel.unit)
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=7)


def _figure_title(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    steps = [r["step"] for r in rows if "step" in r and r.get("kind") != "eval"]
    skipped = max((r.get("skipped_steps", 0) for r in rows), default=0)
    text = f"{run_dir.name}: {max(steps, default=0)} steps"
    return text + (f", {skipped} skipped (non-finite loss)" if skipped else "")


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, *, each: bool = False) -> list[Path]:
    """Write ``dashboard.png`` (and with ``each`` one PNG per metric) under ``out_dir`` (default RUN_DIR/plots).

    Returns the written paths, the dashboard first.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    series = _series(rows)
    if not series:
        raise ValueError(f"no metrics to plot in {run_dir / METRICS_FILE} (missing or empty)")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    panels = _assign(series)
    n_rows = math.ceil(len(panels) / _COLUMNS)
    fig, axes = plt.subplots(n_rows, _COLUMNS, figsize=(5 * _COLUMNS, 3.4 * n_rows), squeeze=False)
    for ax, (panel, keys) in zip(axes.flat, panels, strict=False):
        _draw(ax, panel, keys, series)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(_figure_title(run_dir, rows))
    fig.tight_layout()
    written = [out / DASHBOARD_FILE]
    fig.savefig(written[0], dpi=100)
    plt.close(fig)
    if each:
        for panel, keys in panels:
            for key in keys:
                fig, ax = plt.subplots(figsize=(5, 3.4))
                _draw(ax, Panel(panel.label(key), panel.unit, panel.claims, panel.label, panel.log), [key], series)
                fig.tight_layout()
                written.append(out / f"{key.replace('/', '_')}.png")
                fig.savefig(written[-1], dpi=90)
                plt.close(fig)
    return written
