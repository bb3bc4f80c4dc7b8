"""--resume applies the config keys it can (continuously) and refuses the others by name."""

import json
import math
import re
from pathlib import Path

import pytest

from opd_fast.runner.learn import lr_lambda
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.run_dir import RunDirError
from opd_fast.runner.trainer import train


def lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run_dir) if r.get("kind") != "eval"}


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]


def test_resume_applies_a_new_learning_rate(make_config, tmp_path: Path) -> None:
    opts = {"optim": {"steps": 4, "lr": 1e-2}}
    train(make_config(tmp_path / "run", **opts), stop_after=2)
    train(make_config(tmp_path / "run", optim={"steps": 4, "lr": 2e-2}), resume=True)
    got = lrs(tmp_path / "run")
    assert got[2] == pytest.approx(1e-2 * lr_lambda(1, 0, 4, 0.1))
    assert got[3] == pytest.approx(2e-2 * lr_lambda(2, 0, 4, 0.1))  # the new lr, on the same schedule
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["lr"] == 2e-2
    entries = history(tmp_path / "run")
    assert [e["start_step"] for e in entries] == [0, 2]
    assert entries[1]["changed"] == {"optim.lr": [1e-2, 2e-2]} and entries[1]["config"]["optim"]["lr"] == 2e-2


def test_more_steps_on_resume_continue_the_schedule_without_a_jump(make_config, tmp_path: Path) -> None:
    old = {"optim": {"steps": 4, "lr": 1e-2}}
    new = {"optim": {"steps": 8, "lr": 1e-2}}
    for name in ("once", "twice"):
        train(make_config(tmp_path / name, **old), stop_after=2)
    train(make_config(tmp_path / "once", **new), resume=True)
    train(make_config(tmp_path / "twice", **new), resume=True, stop_after=5)
    train(make_config(tmp_path / "twice", **new), resume=True)  # the re-stretched schedule is checkpointed
    f0 = lr_lambda(2, 0, 4, 0.1)  # the multiplier where the first run stopped
    expected = {s: 1e-2 * (0.1 + (f0 - 0.1) * 0.5 * (1 + math.cos(math.pi * (s - 3) / 6))) for s in range(3, 9)}
    once = lrs(tmp_path / "once")
    assert [once[s] for s in range(3, 9)] == pytest.approx([expected[s] for s in range(3, 9)])
    assert once[3] == pytest.approx(1e-2 * f0)  # continuous at the resume point
    assert lrs(tmp_path / "twice") == pytest.approx(once)


@pytest.mark.parametrize(("section", "values", "key"), [
    ("optim", {"betas": [0.8, 0.99]}, "optim.betas"),
    ("run", {"seed": 5}, "run.seed"),
    ("loss", {"divergence": "jsd"}, "loss.divergence"),
    ("student", {"path": "teacher_b"}, "student.path"),
])
def test_resume_refuses_changes_it_cannot_apply(make_config, models: dict, tmp_path: Path, section: str,
                                               values: dict, key: str) -> None:
    train(make_config(tmp_path / "run"), stop_after=1)
    recorded = (tmp_path / "run" / "config.json").read_text()
    if key == "student.path":
        values = {"path": models["teacher_b"]}
    with pytest.raises(RunDirError, match=re.escape(f"{key}: ")):
        train(make_config(tmp_path / "run", **{section: values}), resume=True)
    assert (tmp_path / "run" / "config.json").read_text() == recorded  # nothing recorded that was not used


def test_resume_refuses_fewer_steps_than_already_done(make_config, tmp_path: Path) -> None:
    train(make_config(tmp_path / "run"), stop_after=2)
    with pytest.raises(RunDirError, match=r"'optim\.steps' = 1 is below the checkpoint's step 2"):
        train(make_config(tmp_path / "run", optim={"steps": 1}), resume=True)
