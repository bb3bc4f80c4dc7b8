"""Disjoint train / eval splits for generated tasks: a candidate's split is a fixed hash of its key.

A task that generates its examples draws candidates from a seeded stream and keeps those whose key
hashes into the wanted split, so no eval example is ever trained on, whatever the seed or the count.
The hash is cryptographic because arithmetic ones correlate with the digits (e.g. ``(7919 a + 104729 b)
% 10 == 0`` is exactly "the units column sums to 0 or 10"), which would make the eval split a digit
pattern.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import TypeVar

from . import Example

SPLITS = ("train", "eval")
T = TypeVar("T")


def in_eval_split(key: str) -> bool:
    """True for the 10% of keys whose hash puts them in the eval split."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") % 10 == 0


def sample_split(
    stream: str,
    split: str,
    n: int,
    seed: int,
    propose: Callable[[random.Random], T],
    key: Callable[[T], str],
    build: Callable[[random.Random, T], Example],
) -> list[Example]:
    """``n`` examples of ``split`` from the stream ``random.Random(f"{stream}/{split}/{seed}")``: ``propose``
    draws a candidate, which is kept when its ``key`` is in ``split``; ``build`` turns a kept one into the
    example (drawing from the same stream, after the check)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{stream}/{split}/{seed}")
    want_eval = split == "eval"
    out: list[Example] = []
    while len(out) < n:
        candidate = propose(rng)
        if in_eval_split(key(candidate)) == want_eval:
            out.append(build(rng, candidate))
    return out
