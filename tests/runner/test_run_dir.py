"""A run directory that holds a run is never silently reused, pruned across runs, or misreported."""

import json
from pathlib import Path

import pytest

from opd_fast.cli import main
from opd_fast.runner.checkpoint import checkpoints, save_checkpoint
from opd_fast.runner.run_dir import RunDirError
from opd_fast.runner.trainer import Trainer


def test_second_run_into_a_used_dir_is_refused_and_overwrite_replaces_it(
    toml_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = toml_config
    out = tmp_path / "out"
    assert main(["train", str(config), "--set", "eval.at_end=false"]) == 0  # 2 steps, checkpoints 1 and 2
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (out / "metrics.jsonl", out / "config.json")}
    with pytest.raises(RunDirError, match=r"already holds a run .*--resume .*--overwrite"):
        main(["train", str(config), "--set", "optim.steps=1"])
    assert {p: p.read_bytes() for p in before} == before  # the first run's records are untouched
    assert [p.name for p in checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert main(["train", str(config), "--overwrite", "--set", "optim.steps=1", "--set", "eval.at_end=false"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [p.name for p in checkpoints(out)] == ["step-00000001"]  # the old run's step 2 is gone with it
    assert Path(summary["checkpoint"]).is_dir()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "config.json").read_text())["optim"]["steps"] == 1
    with pytest.raises(SystemExit):  # argparse: not allowed together
        main(["train", str(config), "--resume", "--overwrite"])


def test_pruning_keeps_other_runs_checkpoints(make_config, tmp_path: Path) -> None:
    trainer = Trainer(make_config(tmp_path / "run"))
    save_checkpoint(tmp_path / "run", 7, trainer.student, {"run_id": "other"}, keep=1)
    for step in (1, 2):
        kept = save_checkpoint(tmp_path / "run", step, trainer.student, {"run_id": "mine"}, keep=1)
        assert kept.is_dir()  # the checkpoint just written survives its own pruning
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-00000002", "step-00000007"]
