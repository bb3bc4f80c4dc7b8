"""One colour per implementation and per stage, the same in every figure.

A reader compares figures side by side: if ``opd_fast:cpu`` is blue in one plot and orange in the
next (colours assigned by position, as matplotlib's cycle does), every comparison is a trap. Known
names get fixed colours; any other name gets a colour derived from the name itself, so it too is
stable across runs and figures.
"""

from __future__ import annotations

import zlib

import matplotlib

matplotlib.use("Agg")
from matplotlib import colormaps

IMPLEMENTATION_COLOURS: dict[str, str] = {
    "gemm-floor": "#7f7f7f",
    "opd_fast:cpu": "#1f77b4",
    "opd_fast:torch": "#17becf",
    "opd_fast:triton": "#393b79",
    "naive": "#8c564b",
    "trl": "#d62728",
    "trl-full-logits": "#ff9896",
    "liger": "#2ca02c",
    "liger-eager": "#98df8a",
    # end-to-end arms: TRL in reds, opd-fast modes in blues
    "trl-gkd": "#d62728",
    "trl-distill": "#ff9896",
    "opd-fast-serial": "#9ecae1",
    "opd-fast-strict": "#1f77b4",
    "opd-fast-async1": "#08306b",
}
STAGE_COLOURS: dict[str, str] = {
    "rollout": "#1f77b4",
    "sample": "#aec7e8",
    "score": "#ff7f0e",
    "learn": "#2ca02c",
    "optim": "#9467bd",
}
DTYPE_LINESTYLES: dict[str, str] = {"fp32": "-", "bf16": "--", "fp16": ":"}
SETTING_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _derived(name: str) -> str:
    cmap = colormaps["tab20b"]
    r, g, b, _ = cmap(zlib.crc32(name.encode()) % cmap.N)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def implementation_colour(name: str) -> str:
    """Fixed colour of a benchmarked implementation or end-to-end arm."""
    return IMPLEMENTATION_COLOURS.get(name) or _derived(name)


def stage_colour(stage: str) -> str:
    """Fixed colour of a runner stage in timelines and stage-time panels."""
    return STAGE_COLOURS.get(stage) or _derived(stage)
