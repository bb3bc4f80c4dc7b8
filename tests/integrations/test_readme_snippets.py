"""The README's scale-out and embedding snippets run as written (the torchrun one on 2 gloo processes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Scale-out and embedding"

pytestmark = pytest.mark.slow  # TRL's import, a compile and a 2-process run (about a minute)


def _snippets() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    section = text[start : text.index("\n## ", start + len(SECTION))]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_section_has_the_snippets() -> None:
    snippets = _snippets()
    assert len(snippets) == 4, [s.splitlines()[0] for s in snippets]
    assert snippets[0].startswith("# torchrun --nproc-per-node 2 vocab_parallel.py")


def test_torchrun_snippet(tmp_path: Path) -> None:
    script = tmp_path / "vocab_parallel.py"
    script.write_text(_snippets()[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = sorted(re.findall(r"rank (\d): loss ([\d.]+), head shard \((\d+), 32\)", done.stdout))
    assert [(r, rows) for r, _, rows in losses] == [("0", "501"), ("1", "500")], done.stdout
    assert losses[0][1] == losses[1][1]  # the same loss on every rank


def test_in_process_snippets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, snippet in enumerate(_snippets()[1:], 1):  # one namespace: the TRL snippet reuses the HF one's models
        # Each snippet runs from a file of its own: torch.compile reads a frame's source from its code's file, and
        # the README is not Python.
        source = tmp_path / f"readme_snippet_{i}.py"
        source.write_text(snippet)
        exec(compile(snippet, str(source), "exec"), namespace)
    assert namespace["trainer"].state.global_step == 1
