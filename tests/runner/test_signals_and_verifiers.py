"""Signals: a second Ctrl-C force-quits, SIGTERM stops an evaluation. Verifier files beside the config."""

import os
import signal
from pathlib import Path

import pytest

from opd_fast.cli import main
from opd_fast.runner.checkpoint import latest_checkpoint
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.trainer import Trainer, train


def test_second_sigint_force_quits_without_finishing_the_step(toml_config: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    real_step = Trainer.train_step

    def impatient(self: Trainer) -> dict:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: finish the step, checkpoint, stop
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: quit now
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", impatient)
    before = signal.getsignal(signal.SIGINT)
    assert main(["train", str(toml_config)]) == 130
    assert "second interrupt" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "out") is None and read_metrics(tmp_path / "out") == []
    assert signal.getsignal(signal.SIGINT) == before  # the run's handlers are gone again


def test_sigterm_during_the_final_evaluation_stops_it(make_config, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_evaluate = Trainer.evaluate

    def evaluate_then_terminated(self: Trainer) -> dict:
        calls.append(self.step)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(self)  # a long evaluation would still be running here

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_terminated)
    summary = train(make_config(tmp_path / "run", optim={"steps": 2}, eval={"at_end": True}))
    assert calls == [2] and summary["interrupted"] and summary["eval"] == {}
    assert not any(r.get("kind") == "eval" for r in read_metrics(tmp_path / "run"))
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"  # written before the evaluation


def test_verifier_file_next_to_the_config_needs_no_pythonpath(toml_config: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    calls = tmp_path / "calls.txt"
    for name in ("my_verifier.py", "checks.py"):
        (tmp_path / name).write_text(
            "def check(prompt, completion, reference):\n"
            f"    with open({str(calls)!r}, 'a') as f:\n"
            f"        f.write({name!r} + '\\n')\n"
            "    return 1.0\n"
        )
    with toml_config.open("a") as f:
        f.write('[loss]\nverifier_weight = 1.0\nverifiers = { a = "my_verifier:check" }\n')
    assert main(["train", str(toml_config), "--set", "optim.steps=1", "--set", "eval.at_end=false"]) == 0
    assert set(calls.read_text().split()) == {"my_verifier.py"}
    calls.unlink()
    assert main(["train", str(toml_config), "--overwrite", "--set", "optim.steps=1", "--set", "eval.at_end=false",
                 "--set", "loss.verifiers.a='checks.py:check'"]) == 0
    assert set(calls.read_text().split()) == {"checks.py"}
    capsys.readouterr()
    run_files = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(ValueError, match=r"'loss\.verifiers\.a': cannot import .*absent\.py"):
        main(["train", str(toml_config), "--overwrite", "--set", "loss.verifiers.a='absent.py:check'"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == run_files  # a failed start deletes nothing
