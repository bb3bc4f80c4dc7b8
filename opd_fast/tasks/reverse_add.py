"""Built-in task ``reverse_add``: multi-digit addition written least-significant digit first, with a retry token.

Prompt ``"{a}+{b}="`` and answer ``"{a+b}"``, every number written with its digits reversed and
zero-padded (``n`` digits for the operands, ``n + 1`` for the sum), so each answer digit depends on the
aligned operand digits and the carry from the previous one: a short chain where one slip ruins the
answer. The answer may use ``<`` to delete the previous character, so a model that notices a wrong
digit can take it back (``"13<2"`` reads ``"12"``). The verifier grades the answer after applying the
deletions, by exact match.

The retry token is what gives on-policy distillation something to win here: a teacher that knows how
to recover can show the student recovery on the student's *own* slips, which no dataset of clean
answers contains (see examples/demo/README.md). ``with_retries`` writes such demonstrations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import Example, register_task

RETRY = "<"
ALPHABET = "0123456789+=" + RETRY
_SPLIT_SALT = {"train": 0, "eval": 1}


def apply_retries(text: str) -> str:
    """``text`` with every ``<`` deleting the character before it (a leading ``<`` deletes nothing)."""
    out: list[str] = []
    for ch in text:
        if ch == RETRY:
            if out:
                out.pop()
        else:
            out.append(ch)
    return "".join(out)


def with_retries(answer: str, rate: float, rng: random.Random) -> list[tuple[str, bool]]:
    """``answer`` as (text, learn) pieces where each digit is, with probability ``rate``, first written
    wrong and taken back: ``[(wrong, False), ("<" + right, True)]``.

    ``learn=False`` marks the slip itself: a model trained on these pieces learns to recover from a
    wrong digit without learning to write one.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    pieces: list[tuple[str, bool]] = []
    for digit in answer:
        if rng.random() < rate:
            wrong = rng.choice([d for d in "0123456789" if d != digit])
            pieces += [(wrong, False), (RETRY + digit, True)]
        else:
            pieces.append((digit, True))
    return pieces


@dataclass(frozen=True)
class ReverseAdd:
    """``n``-digit reversed addition; train and eval splits are disjoint by construction."""

    digits: int = 6
    name: str = "reverse_add"

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or self.digits < 1:
            raise ValueError(f"digits must be an int >= 1, got {self.digits!r}")

    def _is_eval(self, a: int, b: int) -> bool:
        # A fixed hash of the operand pair decides the split, so no eval prompt is ever trained on.
        return (a * 7919 + b * 104729) % 10 == 0

    def example(self, a: int, b: int) -> Example:
        n = self.digits
        prompt = f"{str(a).zfill(n)[::-1]}+{str(b).zfill(n)[::-1]}="
        return Example(prompt=prompt, reference=str(a + b).zfill(n + 1)[::-1])

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        if split not in _SPLIT_SALT:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}/{self.digits}/{split}/{seed}")
        want_eval = split == "eval"
        out: list[Example] = []
        top = 10**self.digits
        while len(out) < n:
            a, b = rng.randrange(top), rng.randrange(top)
            if self._is_eval(a, b) == want_eval:
                out.append(self.example(a, b))
        return out

    def verify(self, prompt: str, completion: str, reference: str) -> float:
        return float(apply_retries(completion.strip()) == reference)


@register_task("reverse_add")
def _reverse_add() -> ReverseAdd:
    return ReverseAdd()
