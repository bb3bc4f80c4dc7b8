"""Learning-rate schedules (``optim.schedule``): their shape, and resume giving the uninterrupted sequence."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from opd_fast.runner.learn import lr_lambda
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.trainer import train


@pytest.mark.parametrize(("schedule", "end"), [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)])
def test_schedule_shapes(schedule: str, end: float) -> None:
    values = [lr_lambda(s, 2, 10, 0.1, schedule) for s in range(11)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warm-up: no step at a zero rate
    assert values[-1] == pytest.approx(end) and all(a >= b for a, b in itertools.pairwise(values[2:]))
    if schedule == "linear":
        assert values[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_resume_gives_the_uninterrupted_lr_sequence(make_config, tmp_path: Path, schedule: str) -> None:
    optim = {"steps": 5, "lr": 1e-2, "warmup_steps": 1, "schedule": schedule}
    train(make_config(tmp_path / "once", optim=optim))
    train(make_config(tmp_path / "twice", optim=optim), stop_after=2)
    train(make_config(tmp_path / "twice", optim=optim), resume=True)
    once, twice = ([r["lr"] for r in read_metrics(tmp_path / n) if r.get("kind") != "eval"] for n in ("once", "twice"))
    assert twice == once == pytest.approx([1e-2 * lr_lambda(s, 1, 5, 0.1, schedule) for s in range(5)])
