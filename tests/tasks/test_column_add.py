"""The shipped column_add task: determinism, disjoint splits, correct references, the verifier, retries."""

import random

import pytest

from opd_fast.tasks.column_add import RETRY, TAGS, ColumnAdd, apply_retries, with_retries


def _columns(text: str, width: int) -> list[str]:
    """Split a tagged text into its per-column digit groups, checking the tags."""
    groups = [text[i : i + width] for i in range(0, len(text), width)]
    assert [g[0] for g in groups] == list(TAGS[: len(groups)])
    return [g[1:] for g in groups]


def test_splits_are_disjoint_and_references_are_sums():
    task = ColumnAdd(digits=3)
    train = task.examples("train", 400, 0)
    evals = task.examples("eval", 200, 0)
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    for ex in train + evals:
        assert ex.prompt.endswith("=")
        cols = _columns(ex.prompt[:-1], 3)
        a = int("".join(c[0] for c in cols)[::-1])
        b = int("".join(c[1] for c in cols)[::-1])
        assert int("".join(_columns(ex.reference, 2))[::-1]) == a + b


def test_eval_split_is_not_a_digit_pattern():
    # The eval split must look like the train split: e.g. every units-column sum occurs in both.
    task = ColumnAdd(digits=3)
    for split in ("train", "eval"):
        sums = {int(e.prompt[1]) + int(e.prompt[2]) for e in task.examples(split, 500, 0)}
        assert sums == set(range(19)), split


def test_verifier_grades_after_retries():
    task = ColumnAdd(digits=2)
    ex = task.example(57, 68)  # 57 + 68 = 125
    assert ex.prompt == "A78B56=" and ex.reference == "A5B2C1"
    assert task.verify(ex.prompt, "A5B2C1", ex.reference) == 1.0
    assert task.verify(ex.prompt, " A5B2C1\n", ex.reference) == 1.0
    assert task.verify(ex.prompt, "A5B9<2C1", ex.reference) == 1.0
    assert task.verify(ex.prompt, "A5B2", ex.reference) == 0.0
    assert task.verify(ex.prompt, "A5B2C11", ex.reference) == 0.0
    assert task.verify(ex.prompt, "<<A5B2C1", ex.reference) == 1.0  # a leading retry deletes nothing


def test_apply_retries():
    assert apply_retries("13<2") == "12"
    assert apply_retries("1<<") == ""
    assert apply_retries("") == ""


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_with_retries_reads_as_the_answer_and_masks_only_slips(rate):
    rng = random.Random(0)
    for answer in ["A0", "A1B2C3D4E5", "A9B9C9D9E0"]:
        pieces = with_retries(answer, rate, rng)
        assert apply_retries("".join(t for t, _ in pieces)) == answer
        for i, (text, learn) in enumerate(pieces):
            if not learn:  # a slip: one wrong digit, always followed by its retraction
                assert len(text) == 1 and text.isdigit() and pieces[i + 1][0].startswith(RETRY)
        slips = sum(not learn for _, learn in pieces)
        if rate in (0.0, 1.0):
            assert slips == rate * sum(c.isdigit() for c in answer)


def test_bad_arguments():
    with pytest.raises(ValueError, match="digits"):
        ColumnAdd(digits=0)
    with pytest.raises(ValueError, match="rate"):
        with_retries("1", 1.5, random.Random(0))
