"""Benchmark shapes and dtypes as the command line spells them.

One spelling everywhere, in the order of the GEMM the loss performs — hidden ``(N, H)`` times
head ``(H, V)``: ``N x H x V`` (tokens x hidden x vocabulary), e.g. ``2048x1024x32768``; when
the teacher's hidden size differs, ``N x H_S/H_T x V`` (``2048x1024/2048x131072``). Named
presets stand for lists of shapes (``small``: the default, about a minute on a 2-core CPU;
``large``: the headline shapes, tens of minutes there).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPE_FORMAT = "NxHxV or NxH_S/H_TxV (tokens x hidden x vocab), e.g. 2048x1024x32768 or 2048x1024/2048x131072"
SHAPE_PRESETS: dict[str, str] = {
    "small": "512x256x8192",
    "large": "2048x1024x32768,8192x1024x32768,2048x1024x131072,8192x1024x131072",
}
_SHAPE_RE = re.compile(r"(\d+)x(\d+)(?:/(\d+))?x(\d+)")


@dataclass(frozen=True)
class Shape:
    """Tokens ``n``, vocabulary ``v``, student and teacher hidden sizes."""

    n: int
    v: int
    h_s: int
    h_t: int

    @property
    def hidden(self) -> str:
        return str(self.h_s) if self.h_s == self.h_t else f"{self.h_s}/{self.h_t}"

    @property
    def spec(self) -> str:
        """The command-line spelling (``parse_shape(shape.spec) == shape``)."""
        return f"{self.n}x{self.hidden}x{self.v}"

    @property
    def label(self) -> str:
        return f"N={self.n} H={self.hidden} V={self.v}"

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parse_shape(text: str) -> Shape:
    """``"NxHxV"`` or ``"NxH_S/H_TxV"`` to a ``Shape``; anything else is a ``ValueError`` naming the format.

    A hidden size above the vocabulary is refused: no language model has one, and it is what a
    shape written in another order (``N x V x H``) looks like.
    """
    match = _SHAPE_RE.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"shape must be {SHAPE_FORMAT}; got {text!r}")
    n, h_s, h_t, v = (int(g) if g is not None else None for g in match.groups())
    h_t = h_s if h_t is None else h_t
    if min(n, h_s, h_t, v) < 1:
        raise ValueError(f"shape sizes must be positive ({SHAPE_FORMAT}); got {text!r}")
    if max(h_s, h_t) > v:
        raise ValueError(f"shape {text!r} reads as hidden {max(h_s, h_t)} > vocab {v}: the order is {SHAPE_FORMAT}")
    return Shape(n, v, h_s, h_t)


def shape_arg(text: str) -> Shape:
    """``parse_shape`` as an argparse ``type``: the reason reaches the user (argparse hides a ValueError's)."""
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_shapes(text: str) -> list[Shape]:
    """A preset name (one of ``SHAPE_PRESETS``) or comma-separated shapes."""
    text = SHAPE_PRESETS.get(text.strip(), text)
    shapes = [parse_shape(s) for s in text.split(",") if s.strip()]
    if not shapes:
        raise ValueError(f"no shapes given: use a preset ({', '.join(SHAPE_PRESETS)}) or {SHAPE_FORMAT}")
    return shapes


def parse_dtypes(text: str) -> list[str]:
    """Comma-separated dtype names, each one of ``DTYPES``."""
    names = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise ValueError(f"dtypes must be a comma-separated subset of {sorted(DTYPES)}, got {text!r}")
    return names


def grid(ns: list[int], vs: list[int], h_s: int, h_t: int | None = None) -> list[Shape]:
    """Every (N, V) pair, smallest work first so cheap cases finish before expensive ones."""
    shapes = [Shape(n, v, h_s, h_t or h_s) for n in ns for v in vs]
    return sorted(shapes, key=lambda s: (s.n * s.v, s.n))
