"""The stage timeline: intervals per lane, the step metrics derived from them, timeline.jsonl."""

import json
import threading
from pathlib import Path

import pytest

from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.timeline import STAGES, TIMELINE_FILE, Interval, Timeline, read_timeline, stage_metrics
from opd_fast.runner.trainer import train

SCHEMA = {"step", "stage", "lane", "micro_batch", "start", "end"}


def test_intervals_carry_their_lane_and_step_and_are_handed_out_once(tmp_path: Path) -> None:
    timeline = Timeline()
    timeline.open(tmp_path, 0)
    with timeline.stage(1, "rollout", 0):
        pass

    def worker() -> None:
        with timeline.stage(1, "score", 0):
            pass
        with timeline.stage(2, "rollout", 0):  # a later step's work, recorded early (async mode)
            pass

    thread = threading.Thread(target=worker, name="score-worker")
    thread.start()
    thread.join()
    first = timeline.close_step(1)
    assert [(i.stage, i.lane, i.micro_batch) for i in first] == [("rollout", "main", 0), ("score", "score-worker", 0)]
    assert all(0 <= i.start <= i.end for i in first)
    assert timeline.close_step(1) == []
    assert [i.step for i in timeline.close_step(2)] == [2]
    timeline.close()
    rows = read_timeline(tmp_path)
    assert [set(r) for r in rows] == [SCHEMA] * 3 and [r["step"] for r in rows] == [1, 1, 2]


def test_reopening_at_a_checkpoint_drops_later_steps(tmp_path: Path) -> None:
    rows = [{"step": s, "stage": "learn", "lane": "main", "micro_batch": None, "start": 0.0, "end": 1.0}
            for s in (1, 2, 3)]
    (tmp_path / TIMELINE_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    timeline = Timeline()
    timeline.open(tmp_path, 2)
    timeline.close()
    assert [r["step"] for r in read_timeline(tmp_path)] == [1, 2]


@pytest.mark.parametrize(("intervals", "wall", "busy", "efficiency"), [
    ([], 2.0, {}, 0.0),
    ([("rollout", 0.0, 1.0), ("score", 1.0, 1.5), ("learn", 1.5, 2.0)], 2.0,
     {"rollout": 1.0, "score": 0.5, "learn": 0.5}, 1.0),  # serial: the stages tile the step
    ([("rollout", 0.0, 1.0), ("rollout", 1.0, 2.0), ("score", 0.5, 1.5), ("learn", 1.5, 2.0)], 2.0,
     {"rollout": 2.0, "score": 1.0, "learn": 0.5}, 1.75),  # scoring overlaps the second rollout
])
def test_stage_metrics_sum_busy_time_per_stage(intervals: list, wall: float, busy: dict, efficiency: float) -> None:
    recorded = [Interval(1, stage, "main", None, start, end) for stage, start, end in intervals]
    metrics = stage_metrics(recorded, wall)
    assert metrics["overlap_efficiency"] == pytest.approx(efficiency)
    for stage in STAGES:
        assert metrics[f"time/{stage}"] == pytest.approx(busy.get(stage, 0.0))
        assert metrics[f"idle/{stage}"] == pytest.approx(wall - busy.get(stage, 0.0))


@pytest.mark.parametrize(("pipeline", "prompts", "score_lanes"), [
    ("serial", 2, {"main"}),
    ("strict", 2, {"score-worker"}),
    ("strict", 1, {"main"}),  # one micro-batch per step: nothing to overlap, so it runs serially
])
def test_a_run_writes_every_stage_of_every_step(make_config, tmp_path: Path, pipeline: str, prompts: int,
                                                score_lanes: set[str]) -> None:
    config = make_config(tmp_path / "run", run={"pipeline": pipeline}, optim={"steps": 2},
                         data={"prompts_per_step": prompts, "group_size": 2})  # micro-batches of 2 samples
    train(config)
    rows = read_timeline(tmp_path / "run")
    assert {r["step"] for r in rows} == {1, 2}
    for step in (1, 2):
        mine = [r for r in rows if r["step"] == step]
        for stage in ("rollout", "learn"):
            assert sorted(r["micro_batch"] for r in mine if r["stage"] == stage) == list(range(prompts))
        # scoring: the prompts' prefill and each row group of a micro-batch, its own interval each
        assert {r["micro_batch"] for r in mine if r["stage"] == "score"} == set(range(prompts))
        assert [r["micro_batch"] for r in mine if r["stage"] == "optim"] == [None]
        assert {r["lane"] for r in mine if r["stage"] == "score"} == score_lanes
    metrics = [r for r in read_metrics(tmp_path / "run") if r.get("kind") != "eval"]
    for row in metrics:
        mine = [r for r in rows if r["step"] == row["step"]]
        assert row["time/score"] == pytest.approx(sum(r["end"] - r["start"] for r in mine if r["stage"] == "score"))
        assert row["overlap_efficiency"] > 0 and row["idle/learn"] >= 0
