"""The layout rules of a sharded call, as every rank derives them from the gathered facts (no processes)."""

from __future__ import annotations

import re

import pytest
import torch

import opd_fast
from opd_fast.distributed.layout import _layout, _RankFacts

TWO_HEADS = ["student_weight", "teacher_weight"]


def _facts(*rows, leading=(4,), dtensor=False) -> list[_RankFacts]:
    return [_RankFacts(r, leading, dtensor) for r in rows]


@pytest.mark.parametrize(("facts", "names", "expected"), [
    (_facts((19, 19), (18, 18)), TWO_HEADS, (19, 18)),
    (_facts((5,), (5,), (4,)), ["weight"], (5, 5, 4)),
    (_facts((19, 20), (18, 18)), TWO_HEADS, r"rank 0: student_weight has 19 rows but teacher_weight has 20"),
    (_facts((19, 37), (18, 37)), TWO_HEADS, r"teacher_weight holds the whole vocabulary \(37 rows\)"),
    (_facts((19, None), (18, 18)), TWO_HEADS, r"rank 0: teacher_weight must be a 2-D \(V_shard, H\) tensor"),
    (_facts((3,), (0,)), ["weight"], r"rank\(s\) \[1\] hold no vocabulary rows"),
    ([_RankFacts((3,), (4,), False), _RankFacts((3,), (5,), False)], ["weight"], r"must be replicated.*rank 1 \(5,\)"),
    (_facts((3,), (3,), dtensor=True), ["weight"], r"a DTensor head cannot also be sharded by process_group"),
])
def test_layout(facts, names, expected) -> None:
    got = _layout(facts, names)
    if isinstance(expected, tuple):
        assert got == expected
    else:
        assert isinstance(got, str), got
        assert re.search(expected, got), got


def test_process_group_needs_an_initialized_torch_distributed() -> None:
    h, w = torch.randn(2, 4), torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        opd_fast.fused_linear_logprobs(h, w, torch.zeros(2, dtype=torch.long), process_group=object())
