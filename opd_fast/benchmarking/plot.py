"""Plots: time and extra peak memory against N and V, log axes, one line per implementation.

Colour names the implementation, line style the dtype (solid fp32, dashed bf16).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .runner import CaseResult

Metric = Callable[[CaseResult], float | None]
_STYLES = {"fp32": "-", "bf16": "--", "fp16": ":"}


def _median(r: CaseResult) -> float | None:
    return r.timed.median if r.timed else None


def _memory(r: CaseResult) -> float | None:
    return r.peak_extra_mb


def _draw(ax, results: list[CaseResult], axis: str, fixed: str, metric: Metric, ylabel: str) -> None:
    """Lines of ``metric`` vs ``axis`` ("n"/"v") at the value of ``fixed`` measured most often."""
    if not results:
        return
    values = [getattr(r.shape, fixed) for r in results if metric(r)]
    if not values:
        return
    at = max(set(values), key=lambda x: (values.count(x), x))  # the slice with the most measurements
    chosen = [r for r in results if getattr(r.shape, fixed) == at and (metric(r) or 0) > 0]  # log axes
    impls = sorted({r.impl for r in results})
    for impl, dtype in sorted({(r.impl, r.dtype) for r in chosen}):
        pts = sorted((getattr(r.shape, axis), metric(r)) for r in chosen if (r.impl, r.dtype) == (impl, dtype))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], _STYLES.get(dtype, "-"), marker="o",
                color=plt.get_cmap("tab10")(impls.index(impl) % 10), label=f"{impl} {dtype}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"{axis.upper()} ({fixed.upper()}={at})")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def plot_loss(results: list[CaseResult], path: str | Path, title: str) -> None:
    """2 x 2: time vs N, time vs V, memory vs N, memory vs V."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    _draw(axes[0][0], results, "n", "v", _median, "fwd+bwd time (s)")
    _draw(axes[0][1], results, "v", "n", _median, "fwd+bwd time (s)")
    _draw(axes[1][0], results, "n", "v", _memory, "extra peak memory (MB)")
    _draw(axes[1][1], results, "v", "n", _memory, "extra peak memory (MB)")
    _finish(fig, path, title)


def plot_memory(results: list[CaseResult], path: str | Path, title: str) -> None:
    """Extra peak memory vs N at fixed V: flat for fused losses, linear for full-logit ones."""
    fig, ax = plt.subplots(figsize=(8, 6))
    _draw(ax, results, "n", "v", _memory, "extra peak memory (MB)")
    _finish(fig, path, title)


def _finish(fig, path: str | Path, title: str) -> None:
    legend = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
