"""The shipped reverse_add task: determinism, disjoint splits, correct references, the verifier, retries."""

import random

import pytest

from opd_fast.tasks import get_task
from opd_fast.tasks.reverse_add import RETRY, ReverseAdd, apply_retries, with_retries


def _operand(text: str) -> int:
    return int(text[::-1])


def test_registered_and_deterministic():
    task = get_task("reverse_add")
    assert task.name == "reverse_add"
    assert task.examples("train", 50, 3) == task.examples("train", 50, 3)
    assert task.examples("train", 50, 3) != task.examples("train", 50, 4)


def test_splits_are_disjoint_and_references_are_sums():
    task = ReverseAdd(digits=3)
    train = task.examples("train", 400, 0)
    evals = task.examples("eval", 200, 0)
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    for ex in train + evals:
        a, b = ex.prompt.rstrip("=").split("+")
        assert len(a) == len(b) == 3 and len(ex.reference) == 4
        assert _operand(ex.reference) == _operand(a) + _operand(b)


def test_verifier_grades_after_retries():
    task = ReverseAdd(digits=2)
    ex = task.example(57, 68)  # 57 + 68 = 125 -> prompt "75+86=", reference "521"
    assert ex.prompt == "75+86=" and ex.reference == "521"
    assert task.verify(ex.prompt, "521", ex.reference) == 1.0
    assert task.verify(ex.prompt, " 521\n", ex.reference) == 1.0
    assert task.verify(ex.prompt, "59<21", ex.reference) == 1.0
    assert task.verify(ex.prompt, "52", ex.reference) == 0.0
    assert task.verify(ex.prompt, "5211", ex.reference) == 0.0
    assert task.verify(ex.prompt, "<<521", ex.reference) == 1.0  # a leading retry deletes nothing


def test_apply_retries():
    assert apply_retries("13<2") == "12"
    assert apply_retries("1<<") == ""
    assert apply_retries("") == ""


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_with_retries_reads_as_the_answer_and_masks_only_slips(rate):
    rng = random.Random(0)
    for answer in ["0", "12345", "99990"]:
        pieces = with_retries(answer, rate, rng)
        assert apply_retries("".join(t for t, _ in pieces)) == answer
        for i, (text, learn) in enumerate(pieces):
            if not learn:  # a slip: one wrong digit, always followed by its retraction
                assert len(text) == 1 and text.isdigit() and pieces[i + 1][0].startswith(RETRY)
        slips = sum(not learn for _, learn in pieces)
        if rate in (0.0, 1.0):
            assert slips == rate * len(answer)


def test_bad_arguments():
    with pytest.raises(ValueError, match="digits"):
        ReverseAdd(digits=0)
    with pytest.raises(ValueError, match="split"):
        ReverseAdd().examples("test", 1, 0)
    with pytest.raises(ValueError, match="rate"):
        with_retries("1", 1.5, random.Random(0))
