"""Checkpoints cannot run code, reach the disk before they count, and a broken newest one is skipped."""

import builtins
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from opd_fast.runner import checkpoint as ckpt_mod
from opd_fast.runner.checkpoint import CheckpointError, _decode, _encode, latest_checkpoint, load_state
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.trainer import train


class _Planted:
    """Unpickling this creates ``marker`` (what a malicious state.pt could do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return builtins.open, (str(self.marker), "w")


def test_planted_pickle_is_refused_without_running_it(make_config, tmp_path: Path) -> None:
    config = make_config(tmp_path / "run", optim={"steps": 2})
    train(config, stop_after=1)
    ckpt = latest_checkpoint(tmp_path / "run")
    for name in ("state.json", "state.safetensors", "state.pt"):
        (ckpt / name).unlink(missing_ok=True)
    marker = tmp_path / "pwned"
    torch.save({"learner": _Planted(marker)}, ckpt / "state.pt")  # torch.load(weights_only=False) would run it
    with pytest.raises(CheckpointError, match=r"state\.pt.*pickle"):
        train(config, resume=True)
    assert not marker.exists()


def test_state_round_trips_exactly_and_unknown_tags_are_refused() -> None:
    gen = torch.Generator().manual_seed(3)
    state = {"rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                     "generator": gen.get_state()},
             "optimizer": {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.randn(3, 2)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": [0]}]},
             "sampler": {"ema": {3: 0.5}}, "step": 7, "nan": float("inf")}
    tensors: dict = {}
    back = _decode(json.loads(json.dumps(_encode(state, tensors))), tensors, "test")
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["rng"]["python"] == state["rng"]["python"]
    np_state, np_back = state["rng"]["numpy"], back["rng"]["numpy"]
    assert np_back[0] == np_state[0] and np.array_equal(np_back[1], np_state[1]) and np_back[1].dtype == np.uint32
    assert np_back[2:] == np_state[2:]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["sampler"] == {"ema": {3: 0.5}} and back["step"] == 7 and back["nan"] == float("inf")
    with pytest.raises(CheckpointError, match="unknown tag '__reduce__'"):
        _decode({"x": {"__reduce__": "os.system"}}, {}, "test")


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_files_and_directories_are_fsynced_around_the_commit(make_config, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, ckpt_mod._rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), real_fsync(fd))[1])

    def rename(src: Path, dst: Path) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(ckpt_mod, "_rename", rename)
    train(make_config(tmp_path / "run", optim={"steps": 1}))
    root = (tmp_path / "run" / "checkpoints").resolve()
    commit = events.index(("rename", str(root / "step-00000001")))
    before = {Path(p).name for kind, p in events[:commit] if kind == "fsync" and ".tmp-" in p}
    assert {"state.json", "state.safetensors", "model.safetensors", "student", "config.json"} <= before
    assert any(p.startswith(str(root / ".tmp-")) and Path(p).name.startswith(".tmp-") for _, p in events[:commit])
    assert ("fsync", str(root)) in events[commit:]  # the rename itself reaches the disk


@pytest.mark.parametrize("damage", ["state_json", "weights"])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(make_config, tmp_path: Path,
                                                                    damage: str) -> None:
    config = make_config(tmp_path / "run", checkpoint={"every": 1, "keep": 3})
    train(config, stop_after=2)
    newest = latest_checkpoint(tmp_path / "run")
    target = newest / ("state.json" if damage == "state_json" else "student/model.safetensors")
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # what a torn write leaves
    with pytest.raises(CheckpointError):
        load_state(newest)
    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint .*step-00000002"):
        summary = train(config, resume=True)
    assert (summary["steps"], summary["steps_run"]) == (3, 2)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_torn_last_metrics_line_is_dropped_and_resume_works(make_config, tmp_path: Path) -> None:
    config = make_config(tmp_path / "run")
    train(config, stop_after=2)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.1')  # the disk filled up mid-row
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:3: dropping a torn last metrics line"):
        summary = train(config, resume=True)
    assert summary["steps_run"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is whole again
        assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_broken_middle_metrics_line_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: invalid JSON"):
        read_metrics(tmp_path)


def test_a_crash_while_rewriting_metrics_keeps_the_old_file(make_config, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path / "run")
    train(config, stop_after=2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 1.0}\n')  # a step after the checkpoint
    before = metrics.read_bytes()

    real_replace = os.replace

    def crash_on_metrics(src: str, dst: str) -> None:
        if Path(dst).name == "metrics.jsonl":
            assert Path(src).read_text().count("\n") == 2  # the rewrite is complete in the temporary file
            raise OSError("power loss during the rewrite")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_metrics)
    with pytest.raises(OSError, match="power loss"):
        train(config, resume=True)
    assert metrics.read_bytes() == before


def test_resuming_a_finished_run_adds_no_eval_rows(make_config, tmp_path: Path) -> None:
    config = make_config(tmp_path / "run", optim={"steps": 2}, eval={"at_end": True, "num_prompts": 2})
    first = train(config)
    again = train(config, resume=True)
    evals = [r for r in read_metrics(tmp_path / "run") if r.get("kind") == "eval"]
    assert len(evals) == 1 and again["steps_run"] == 0
    assert again["eval"] == first["eval"] and Path(again["checkpoint"]).is_dir()
