import json
import re
from pathlib import Path

import pytest

from opd_fast.cli import console, main


def test_train_eval_generate_plot_commands(toml_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = toml_config
    assert main(["train", str(config), "--set", "optim.steps=1", "--set", "loss.divergence='forward_kl'"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and summary["run_dir"] == str(tmp_path / "out")  # out_dir relative to the TOML
    # optim.steps may grow on resume; the divergence must stay what the run trained with
    assert main(["train", str(config), "--resume", "--set", "loss.divergence='forward_kl'"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["steps"], summary["steps_run"]) == (2, 1) and "greedy/accuracy" in summary["eval"]
    assert main(["eval", str(config), "--checkpoint", "latest"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"greedy/accuracy", "reverse_kl"} and "sampled/accuracy" not in result
    assert result == summary["eval"]  # the saved checkpoint evaluates exactly like the in-memory student
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000002" / "student"
    assert main(["generate", str(checkpoint), "--prompt", "ab=", "--max-new-tokens", "3"]) == 0
    assert "'ab=' -> " in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "plots" / "dashboard.png").is_file()


def test_bad_config_key_fails_before_any_work(toml_config: Path) -> None:
    config = toml_config
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.learning_rate'"):
        main(["train", str(config), "--set", "optim.learning_rate=1"])


def test_generate_from_a_run_directory_and_its_checkpoints(
        toml_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(toml_config), "--set", "optim.steps=2", "--set", "eval.at_end=false",
                 "--set", "checkpoint.keep=1"]) == 0  # step 1's checkpoint is pruned by step 2's
    capsys.readouterr()
    run = tmp_path / "out"
    for model, checkpoint in ((run, "latest"), (run, "step-00000002"), (run / "checkpoints" / "step-00000002", None)):
        assert main(["generate", str(model), "--prompt", "ab=", "--max-new-tokens", "2",
                     *(["--checkpoint", checkpoint] if checkpoint else [])]) == 0
        assert "'ab=' -> " in capsys.readouterr().out
    pruned = str(run / "checkpoints" / "step-00000001" / "student")
    for argv, error in (
        ([str(run), "--checkpoint", "step-00000001"], r"no checkpoint 'step-00000001' under .*pruned by "
                                                      r"checkpoint.keep\); checkpoints there: \['step-00000002'\]"),
        ([str(tmp_path / "empty"), "--checkpoint", "latest"], r"no checkpoint under .*empty/checkpoints .*there: none"),
        ([pruned], rf"model: no such local directory {pruned}$"),
        ([str(run)], r"is a run directory: pass --checkpoint latest"),
    ):
        monkeypatch.setattr("sys.argv", ["opd-fast", "generate", *argv, "--prompt", "ab="])
        with pytest.raises(SystemExit) as exit_info:
            console()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(error, err), err  # one line, no traceback
