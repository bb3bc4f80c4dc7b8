"""Built-in task ``pair_sum``: write *any* two numbers that add up to the prompt's number.

The prompt lists the digits of ``N`` from the units up, each tagged with a letter: 825 with 3 digits
is ``"A5B2C8="``. The answer gives two ``digits``-digit numbers ``a`` and ``b`` with ``a + b = N``,
column by column from the units up, each column's tag followed by the digit of ``a`` and the digit
of ``b``: ``a = 300, b = 525`` is ``"A05B02C35"``. Every ``a`` in ``[0, N]`` starts a valid answer, so
a prompt has ``N + 1`` of them, and the verifier accepts each one.

Why this task is on-policy distillation's case rather than its weakest one: the digit of ``a`` in a
column is a free choice, and the digit of ``b`` after it is forced by that choice and by the carry the
answer so far has committed to (``a_i + b_i + carry_i = N_i + 10 carry_{i+1}``, no carry out of the
top column, so there ``a_i <= N_i - carry_i``). A dataset shows one answer per prompt; a model that
samples its own free digits reaches prefixes the dataset never contains, and only the consistent
continuation of *that* prefix is correct. A teacher trained on many answers per prompt knows the
continuation of any feasible prefix, which is the signal on-policy distillation gives the student on
its own samples. The reference of an example (``examples``) is one uniformly drawn valid answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import Example, register_task
from .column_add import TAGS
from .splits import sample_split

ALPHABET = "0123456789=" + TAGS


def encode_number(n: int, digits: int) -> str:
    """``n``'s digits from the units up, each behind its column tag, then ``=`` (the prompt)."""
    units_first = str(n).zfill(digits)[::-1]
    return "".join(TAGS[i] + units_first[i] for i in range(digits)) + "="


def encode_answer(a: int, b: int, digits: int) -> str:
    """The answer text of the pair ``(a, b)``: per column, its tag, the digit of ``a``, the digit of ``b``."""
    a_units, b_units = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
    return "".join(TAGS[i] + a_units[i] + b_units[i] for i in range(digits))


def decode_number(prompt: str, digits: int) -> int | None:
    """The number of a prompt written by ``encode_number``, or None when ``prompt`` is not one."""
    body = prompt[1:-1:2][::-1]
    if len(body) != digits or not body.isdigit() or encode_number(int(body), digits) != prompt:
        return None
    return int(body)


def decode_answer(text: str, digits: int) -> tuple[int, int] | None:
    """``(a, b)`` of an answer text, or None when it is not exactly ``digits`` well-tagged columns."""
    if len(text) != 3 * digits:
        return None
    columns = [text[3 * i : 3 * i + 3] for i in range(digits)]
    if any(col[0] != TAGS[i] or not col[1:].isdigit() for i, col in enumerate(columns)):
        return None
    a = int("".join(col[1] for col in columns)[::-1])
    b = int("".join(col[2] for col in columns)[::-1])
    return a, b


@dataclass(frozen=True)
class PairSum:
    """``digits``-digit targets; train and eval splits hold disjoint targets by construction."""

    digits: int = 4
    name: str = "pair_sum"

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or not 1 <= self.digits <= len(TAGS):
            raise ValueError(f"digits must be an int in [1, {len(TAGS)}], got {self.digits!r}")

    def example(self, n: int, a: int) -> Example:
        """The example of target ``n`` whose reference is the pair ``(a, n - a)``."""
        if not 0 <= a <= n < 10**self.digits:
            raise ValueError(f"need 0 <= a <= n < 10**{self.digits}, got a={a}, n={n}")
        return Example(prompt=encode_number(n, self.digits), reference=encode_answer(a, n - a, self.digits))

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """The reference of a kept target is one uniformly drawn valid pair."""
        return sample_split(f"{self.name}/{self.digits}", split, n, seed,
                            propose=lambda rng: rng.randrange(10**self.digits), key=lambda t: f"pair_sum/{t}",
                            build=lambda rng, t: self.example(t, rng.randint(0, t)))

    def verify(self, prompt: str, completion: str, reference: str) -> float:
        """1 when the completion is any pair adding up to the prompt's number (the reference is one of many)."""
        target = decode_number(prompt, self.digits)
        if target is None:
            raise ValueError(f"pair_sum: {prompt!r} is not a {self.digits}-digit pair_sum prompt")
        pair = decode_answer(completion.strip(), self.digits)
        return float(pair is not None and sum(pair) == target)


@register_task("pair_sum")
def _pair_sum() -> PairSum:
    return PairSum()
