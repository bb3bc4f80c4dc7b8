"""Built-in task ``column_add``: multi-digit addition column by column, units first, with a retry token.

The prompt lists the columns of ``a + b`` from the units up, each tagged with a letter: 357 + 468 with
3 digits is ``"A78B56C34="`` (column A holds 7 and 8, ...). The answer gives the sum's digits under the
same tags, one more column for the final carry: ``"A5B2C8D0"`` (825). Each answer digit depends on its
column and the carry from the previous one: a short chain where one slip ruins the answer.

The answer may use ``<`` to delete the previous character, so a model that notices a wrong digit can
take it back (``"A5B3<2C8D0"`` reads ``"A5B2C8D0"``). The verifier grades the answer after applying the
deletions, by exact match. The tags are what make retries learnable for a tiny model: a retry shifts
every later position, so a model that located columns by position would lose its place, while a tag
lets it find the column by content.

The retry token is what gives on-policy distillation something to win here: a teacher that knows how
to recover can show the student recovery on the student's *own* slips, which no dataset of clean
answers contains (see examples/demo/README.md). ``with_retries`` writes such demonstrations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import Example, register_task
from .splits import sample_split

RETRY = "<"
TAGS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ALPHABET = "0123456789=" + RETRY + TAGS


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
    wrong and taken back: ``[(wrong, False), ("<" + right, True)]``; other characters never slip.

    ``learn=False`` marks the slip itself: a model trained on these pieces learns to recover from a
    wrong digit without learning to write one.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    pieces: list[tuple[str, bool]] = []
    for digit in answer:
        if digit.isdigit() and rng.random() < rate:
            wrong = rng.choice([d for d in "0123456789" if d != digit])
            pieces += [(wrong, False), (RETRY + digit, True)]
        else:
            pieces.append((digit, True))
    return pieces


@dataclass(frozen=True)
class ColumnAdd:
    """``n``-digit column addition; train and eval splits are disjoint by construction."""

    digits: int = 4
    name: str = "column_add"

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or not 1 <= self.digits < len(TAGS):
            raise ValueError(f"digits must be an int in [1, {len(TAGS) - 1}], got {self.digits!r}")

    def example(self, a: int, b: int) -> Example:
        n = self.digits
        a_digits, b_digits, total = str(a).zfill(n)[::-1], str(b).zfill(n)[::-1], str(a + b).zfill(n + 1)[::-1]
        prompt = "".join(TAGS[i] + a_digits[i] + b_digits[i] for i in range(n)) + "="
        return Example(prompt=prompt, reference="".join(TAGS[i] + total[i] for i in range(n + 1)))

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        top = 10**self.digits
        return sample_split(f"{self.name}/{self.digits}", split, n, seed,
                            propose=lambda rng: (rng.randrange(top), rng.randrange(top)),
                            key=lambda pair: f"{pair[0]}+{pair[1]}", build=lambda _rng, pair: self.example(*pair))

    def verify(self, prompt: str, completion: str, reference: str) -> float:
        return float(apply_retries(completion.strip()) == reference)


@register_task("column_add")
def _column_add() -> ColumnAdd:
    return ColumnAdd()
