"""Benchmark figures that cannot mislead.

* The headline is the **x-floor ratio** (loss time / bare-GEMM time measured in the same run): it
  is what carries from one machine to another, so it is the first panel, with a line at 1.0.
* Colour names the implementation (``opd_fast.plotting.palette``: the same in every figure), line
  style or hatch the dtype, marker the *setting* (machine, threads, load).
* Lines join points of one setting only: a point measured on an idle machine is never joined to
  one measured under load, or on another machine.
* One shape means nothing to draw a line along: single-shape results are bars, whiskers min-max.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..plotting.palette import DTYPE_LINESTYLES, SETTING_MARKERS, implementation_colour
from .implementations import FLOOR
from .runner import CaseResult

_HATCHES = ("", "//", "..", "xx", "\\\\", "++")


@dataclass(frozen=True)
class RunGroup:
    """Results measured in one setting (``report.setting``: machine, threads, load)."""

    setting: str
    results: list[CaseResult]


Span = tuple[float, float, float]  # median, min, max
Metric = Callable[[CaseResult], "Span | None"]


def _time(r: CaseResult) -> Span | None:
    t = r.timed
    return None if t is None else (t.median, t.min, t.max)


def _ratio(r: CaseResult) -> Span | None:
    """The recorded median ratio; whiskers: its fastest and slowest run, scaled the same way."""
    t = r.timed
    if t is None or r.ratio_to_floor is None or r.impl == FLOOR:
        return None
    scale = r.ratio_to_floor / t.median
    return r.ratio_to_floor, t.min * scale, t.max * scale


def _memory(r: CaseResult) -> Span | None:
    m = r.peak_extra_mb
    return None if m is None else (m, m, m)


_PANELS: dict[str, tuple[Metric, str, bool]] = {  # metric, axis label, log scale
    "ratio": (_ratio, "fwd+bwd time / GEMM floor (x floor)", False),
    "time": (_time, "fwd+bwd time (s)", True),
    "memory": (_memory, "extra peak memory (MB)", True),
}


def _points(group: RunGroup, metric: Metric) -> list[tuple[CaseResult, Span]]:
    return [(r, span) for r in group.results if (span := metric(r)) is not None and span[0] > 0]


def _impl_order(groups: list[RunGroup]) -> list[str]:
    return list(dict.fromkeys(r.impl for g in groups for r in g.results))


def _errorbar(ax, points: list[tuple[int, Span]], **style) -> None:
    med = [s[0] for _, s in points]
    err = [[max(0.0, s[0] - s[1]) for _, s in points], [max(0.0, s[2] - s[0]) for _, s in points]]
    ax.errorbar([x for x, _ in points], med, yerr=err, **style)


def _lines(ax, groups: list[RunGroup], metric_name: str, axis: str) -> None:
    """``metric`` vs ``axis`` ("n" or "v") at the other size measured most often, one line per setting."""
    metric, ylabel, log = _PANELS[metric_name]
    fixed = "v" if axis == "n" else "n"
    pts = [(g, r, s) for g in groups for r, s in _points(g, metric)]
    if not pts:
        ax.set_visible(False)
        return
    values = [getattr(r.shape, fixed) for _, r, _ in pts]
    at = max(set(values), key=lambda x: (values.count(x), x))
    for gi, group in enumerate(groups):
        chosen = [(r, s) for g, r, s in pts if g is group and getattr(r.shape, fixed) == at]
        for impl, dtype in dict.fromkeys((r.impl, r.dtype) for r, _ in chosen):
            line: dict[int, Span] = {}
            repeats: list[tuple[int, Span]] = []  # a size measured twice in one setting: a point, not a zig-zag
            for r, s in chosen:
                if (r.impl, r.dtype) == (impl, dtype):
                    x = getattr(r.shape, axis)
                    if x in line:
                        repeats.append((x, s))
                    else:
                        line[x] = s
            style = {"color": implementation_colour(impl), "marker": SETTING_MARKERS[gi % len(SETTING_MARKERS)],
                     "capsize": 2, "markersize": 4}
            _errorbar(ax, sorted(line.items()), linestyle=DTYPE_LINESTYLES.get(dtype, "-"), **style)
            if repeats:
                _errorbar(ax, repeats, linestyle="", **style)
    if metric_name == "ratio":
        ax.axhline(1.0, color=implementation_colour(FLOOR), linewidth=1, linestyle=":")
    ax.set_xscale("log", base=2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(f"{'tokens N' if axis == 'n' else 'vocabulary V'} (at {fixed.upper()}={at})")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def _bars(ax, groups: list[RunGroup], metric_name: str) -> list[tuple[str, str]]:
    """Bars per implementation, one per (dtype, setting) variant; returns the variants in hatch order.

    Linear axes: a bar's length is its value (on a log axis the length would depend on where the axis starts).
    """
    metric, ylabel, _log = _PANELS[metric_name]
    impls = _impl_order(groups)
    variants = list(dict.fromkeys((r.dtype, g.setting) for g in groups for r in g.results))
    width = 0.8 / max(len(variants), 1)
    drawn = False
    for g in groups:
        for r, (med, lo, hi) in _points(g, metric):
            vi = variants.index((r.dtype, g.setting))
            x = impls.index(r.impl) - 0.4 + width * (vi + 0.5)
            ax.bar(x, med, width, color=implementation_colour(r.impl), hatch=_HATCHES[vi % len(_HATCHES)],
                   edgecolor="black", linewidth=0.5)
            ax.errorbar(x, med, yerr=[[max(0.0, med - lo)], [max(0.0, hi - med)]], color="black", capsize=3,
                        linewidth=1)
            drawn = True
    if not drawn:
        ax.set_visible(False)
        return variants
    if metric_name == "ratio":
        ax.axhline(1.0, color=implementation_colour(FLOOR), linewidth=1, linestyle=":")
    ax.set_xticks(range(len(impls)), impls, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return variants


def _shapes(groups: list[RunGroup]) -> set:
    return {r.shape for g in groups for r in g.results}


def _legend(fig, groups: list[RunGroup], variants: list[tuple[str, str]] | None) -> None:
    handles = [Patch(color=implementation_colour(i), label=i) for i in _impl_order(groups)]
    if variants is not None:  # bars: hatch = (dtype, setting)
        handles += [Patch(facecolor="white", edgecolor="black", hatch=_HATCHES[i % len(_HATCHES)],
                          label=f"{dtype}, {setting}") for i, (dtype, setting) in enumerate(variants)]
    else:
        dtypes = dict.fromkeys(r.dtype for g in groups for r in g.results)
        handles += [Line2D([], [], color="black", linestyle=DTYPE_LINESTYLES.get(d, "-"), label=d) for d in dtypes]
        handles += [Line2D([], [], color="black", linestyle="", marker=SETTING_MARKERS[i % len(SETTING_MARKERS)],
                           label=g.setting) for i, g in enumerate(groups)]
    fig.legend(handles=handles, loc="lower center", ncol=4 if fig.get_figwidth() > 10 else 2, fontsize=8)


def plot_loss(groups: list[RunGroup], path: str | Path, title: str) -> None:
    """x-floor ratio, time and memory; bars for one shape, lines vs N and vs V for several."""
    groups = [g for g in groups if g.results]
    if len(_shapes(groups)) <= 1:
        fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
        variants = None
        for ax, name in zip(axes, ("ratio", "time", "memory"), strict=True):
            variants = _bars(ax, groups, name)
        shape = next(iter(_shapes(groups)), None)
        title = f"{title}\n{shape.label}" if shape else title
        _finish(fig, groups, variants, path, title)
        return
    fig, axes = plt.subplots(3, 2, figsize=(13, 13))
    for row, name in zip(axes, ("ratio", "time", "memory"), strict=True):
        _lines(row[0], groups, name, "n")
        _lines(row[1], groups, name, "v")
    _finish(fig, groups, None, path, title)


def plot_memory(groups: list[RunGroup], path: str | Path, title: str) -> None:
    """Extra peak memory vs N at fixed V: flat for fused losses, linear for full-logit ones."""
    groups = [g for g in groups if g.results]
    fig, ax = plt.subplots(figsize=(8, 6.5))
    if len({r.shape.n for g in groups for r in g.results}) <= 1:
        _finish(fig, groups, _bars(ax, groups, "memory"), path, title)
        return
    _lines(ax, groups, "memory", "n")
    _finish(fig, groups, None, path, title)


def _finish(fig, groups: list[RunGroup], variants: list[tuple[str, str]] | None, path: str | Path, title: str) -> None:
    _legend(fig, groups, variants)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
