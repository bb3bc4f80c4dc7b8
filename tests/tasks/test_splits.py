"""What every generated built-in task shares (``tasks.splits``): registration, determinism, split checks."""

import pytest

from opd_fast.tasks import BUILTIN_MODULES, get_task
from opd_fast.tasks.splits import in_eval_split


@pytest.mark.parametrize("name", BUILTIN_MODULES)
def test_registered_and_deterministic(name):
    task = get_task(name)
    assert task.name == name
    assert task.examples("train", 50, 3) == task.examples("train", 50, 3)
    assert task.examples("train", 50, 3) != task.examples("train", 50, 4)


@pytest.mark.parametrize("name", BUILTIN_MODULES)
def test_bad_split_arguments(name):
    task = get_task(name)
    with pytest.raises(ValueError, match="split must be 'train' or 'eval', got 'test'"):
        task.examples("test", 1, 0)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        task.examples("train", -1, 0)


def test_a_tenth_of_keys_are_eval():
    share = sum(in_eval_split(f"key/{i}") for i in range(20000)) / 20000
    assert 0.09 < share < 0.11
