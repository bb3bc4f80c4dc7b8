import json
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest

from opd_fast.runner.config import MetricsConfig
from opd_fast.runner.metrics import MetricsLogger, read_metrics


class FakeWriter:
    scalars: ClassVar[list[tuple[str, float, int]]] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        pass


def test_rows_tensorboard_resume_and_truncation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLogger(tmp_path, total_steps=3, metrics=MetricsConfig(progress=False))
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step, "source": "student"})
    log.log({"step": 3, "kind": "eval", "reverse_kl": 0.5}, advance=False)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 3]
    assert ("loss", 0.5, 2) in FakeWriter.scalars and ("eval/reverse_kl", 0.5, 3) in FakeWriter.scalars
    assert not any(tag == "source" for tag, _, _ in FakeWriter.scalars)  # strings are not scalars
    # resuming from the step-2 checkpoint drops the rows of the steps that will be redone
    quiet = MetricsConfig(progress=False, tensorboard=False)
    MetricsLogger(tmp_path, total_steps=3, start_step=2, metrics=quiet).close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_missing_tensorboard_is_said_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.warns(UserWarning, match="tensorboard package is not installed"):
        logger = MetricsLogger(tmp_path, total_steps=1, start_step=0, metrics=MetricsConfig(progress=False))
    assert logger.trackers == []
    logger.close()
