"""Benchmark shapes and dtypes as the command line spells them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """Tokens ``n``, vocabulary ``v``, student and teacher hidden sizes."""

    n: int
    v: int
    h_s: int
    h_t: int

    @property
    def label(self) -> str:
        hidden = str(self.h_s) if self.h_s == self.h_t else f"{self.h_s}/{self.h_t}"
        return f"N={self.n} V={self.v} H={hidden}"

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parse_shape(text: str) -> Shape:
    """``"NxVxH"`` or ``"NxVxH_SxH_T"`` (e.g. ``2048x131072x1024x2048``) to a ``Shape``."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (3, 4) or min(values, default=0) < 1:
        raise ValueError(f"shape must look like NxVxH or NxVxH_SxH_T with positive ints, got {text!r}")
    n, v, h_s = values[:3]
    return Shape(n, v, h_s, values[3] if len(values) == 4 else h_s)


def parse_shapes(text: str) -> list[Shape]:
    """Comma-separated shapes."""
    return [parse_shape(s) for s in text.split(",") if s.strip()]


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
