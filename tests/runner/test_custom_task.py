"""Custom tasks named by their class (``module:Class`` / ``file.py:Class``), from the config or ``--task``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_fast.cli import main
from opd_fast.tasks import get_task

TASK_FILE = '''
from opd_fast.tasks import Example


class Echo:
    """Repeat the letters before '='."""

    def examples(self, split, n, seed):
        words = ["ab", "ba", "abc", "cab"] if split == "train" else ["bca", "acb"]
        return [Example(w + "=", w, "default") for w in words][:n]

    def verify(self, prompt, completion, reference):
        return float(completion.strip() == reference)


class NoVerify:
    def examples(self, split, n, seed):
        return []
'''


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "echo_task.py"
    path.write_text(TASK_FILE)
    return path


def test_a_task_class_is_loaded_by_its_spec(task_file: Path) -> None:
    task = get_task(f"{task_file}:Echo")
    assert [ex.prompt for ex in task.examples("eval", 5, 0)] == ["bca=", "acb="]
    assert task.verify("ab=", " ab", "ab") == 1.0


@pytest.mark.parametrize(("attr", "error"), [
    ("NoVerify", r"'data\.task' = .*NoVerify': the task has no verify method"),
    ("Missing", r"config key 'data\.task': cannot import .*Missing"),
])
def test_a_bad_task_class_is_named(task_file: Path, attr: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        get_task(f"{task_file}:{attr}")


def test_train_and_eval_with_a_task_from_the_command_line(
        toml_config: Path, task_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # --task resolves a relative file against the current directory
    assert main(["train", str(toml_config), "--task", "echo_task:Echo", "--set", "optim.steps=1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and "greedy/accuracy" in summary["eval"]
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())["data"]
    assert (recorded["task"], recorded["prompts"]) == (f"{task_file}:Echo", "")
