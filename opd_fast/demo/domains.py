"""The demo's two domains: one shipped task each, one specialist teacher each, one shared student.

- ``column_add`` (single valid answer; a retry token lets a model take back a slip): a carry chain where
  a student that copies the teacher well does as well off-policy as on-policy.
- ``pair_sum`` (any of ``N + 1`` answers is valid): each column's first digit is a free choice and its
  second is forced by the prefix the model has committed to, so the student's own samples reach states a
  dataset of one answer per prompt never shows; that is where the teacher's signal on the student's
  prefix should matter.

Both tasks write over one character alphabet, so every model of the demo shares one tokenizer (which
teacher-corrected rollouts need: a teacher token replaces a student token one for one). The runner
reads the mixed prompts from JSONL files the demo writes (``write_prompts``), a ``domain`` per line,
and grades each domain with the module-level verifiers below (``loss.verifiers``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..models.tiny import char_tokenizer
from ..tasks import Example
from ..tasks import column_add as column_add_task
from ..tasks import pair_sum as pair_sum_task

COLUMN_ADD = column_add_task.ColumnAdd()
PAIR_SUM = pair_sum_task.PairSum()
assert set(pair_sum_task.ALPHABET) <= set(column_add_task.ALPHABET), "the demo's tasks must share one alphabet"
ALPHABET = column_add_task.ALPHABET


def verify_column_add(prompt: str, completion: str, reference: str) -> float:
    return COLUMN_ADD.verify(prompt, completion, reference)


def verify_pair_sum(prompt: str, completion: str, reference: str) -> float:
    return PAIR_SUM.verify(prompt, completion, reference)


@dataclass(frozen=True)
class Domain:
    """One domain of the demo: its task, the verifier the runner imports (``module:function``), whether
    its answers may contain retries (only ``column_add`` has the retry token) and its longest clean answer."""

    name: str
    task: column_add_task.ColumnAdd | pair_sum_task.PairSum
    verifier: str
    retries: bool
    answer_tokens: int  # EOS included

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """The task's examples tagged with this domain (the runner routes them by it)."""
        return [Example(ex.prompt, ex.reference, self.name) for ex in self.task.examples(split, n, seed)]


DOMAINS: tuple[Domain, ...] = (
    Domain("column_add", COLUMN_ADD, f"{__name__}:verify_column_add", True, 2 * (COLUMN_ADD.digits + 1) + 1),
    Domain("pair_sum", PAIR_SUM, f"{__name__}:verify_pair_sum", False, 3 * PAIR_SUM.digits + 1),
)
DOMAINS_BY_NAME = {d.name: d for d in DOMAINS}


def tokenizer():
    """The tokenizer every model of the demo uses."""
    return char_tokenizer(ALPHABET)


def mixed_examples(split: str, per_domain: int, seed: int) -> list[Example]:
    """``per_domain`` examples of every domain, interleaved (so any prefix of the list is balanced)."""
    parts = [d.examples(split, per_domain, seed) for d in DOMAINS]
    return [ex for group in zip(*parts, strict=True) for ex in group]


def write_prompts(path: Path, examples: list[Example]) -> Path:
    """A JSONL prompt file (``prompt``, ``reference``, ``domain`` per line) the runner reads as ``data.prompts``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for ex in examples:
            fh.write(json.dumps({"prompt": ex.prompt, "reference": ex.reference, "domain": ex.domain}) + "\n")
    return path
