"""The shipped pair_sum task: prompts and answers round-trip, disjoint splits, and a verifier that accepts
every valid pair and nothing else."""

import pytest

from opd_fast.tasks.pair_sum import PairSum, decode_answer, decode_number, encode_answer, encode_number


def test_encoding_is_units_first_and_tagged():
    assert encode_number(825, 3) == "A5B2C8="
    assert encode_answer(300, 525, 3) == "A05B02C35"
    assert decode_number("A5B2C8=", 3) == 825
    assert decode_answer("A05B02C35", 3) == (300, 525)


@pytest.mark.parametrize("prompt", ["A5B2C8", "A5B2=", "A5X2C8=", "A5BxC8=", "A5B2C8D1="])
def test_decode_number_rejects_other_shapes(prompt):
    assert decode_number(prompt, 3) is None


def test_splits_are_disjoint_and_references_are_valid():
    task = PairSum(digits=3)
    train, evals = task.examples("train", 400, 0), task.examples("eval", 100, 0)
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    for ex in train + evals:
        assert task.verify(ex.prompt, ex.reference, ex.reference) == 1.0
    # references are drawn among many answers: the first free digit takes many values
    assert len({ex.reference[1] for ex in train}) == 10


def test_every_valid_pair_is_accepted_and_nothing_else():
    task = PairSum(digits=2)
    prompt = encode_number(57, 2)
    reference = encode_answer(0, 57, 2)
    accepted = {(a, b) for a in range(100) for b in range(100)
                if task.verify(prompt, encode_answer(a, b, 2), reference) == 1.0}
    assert accepted == {(a, 57 - a) for a in range(58)}


@pytest.mark.parametrize("completion,score", [
    ("A07B23", 1.0),       # 20 + 37 = 57
    (" A07B23\n", 1.0),    # surrounding whitespace is ignored
    ("A07B2", 0.0),        # a column short
    ("A07B231", 0.0),      # a digit too many
    ("B07A23", 0.0),       # tags out of order
    ("A0<7B23", 0.0),      # no retry token in this task
    ("A08B23", 0.0),       # 20 + 38 = 58
])
def test_verifier_cases(completion, score):
    assert PairSum(digits=2).verify(encode_number(57, 2), completion, "A70B05") == score


def test_bad_arguments():
    with pytest.raises(ValueError, match="digits"):
        PairSum(digits=0)
    with pytest.raises(ValueError, match="a <= n"):
        PairSum(digits=2).example(10, 11)
    with pytest.raises(ValueError, match="not a 2-digit pair_sum prompt"):
        PairSum(digits=2).verify("A78B56=", "A00B00", "")
