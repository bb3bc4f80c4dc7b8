"""Data-parallel training (``runner.distributed``): 2 gloo processes against one process.

The comparison needs the same rollouts on both sides, but each rank samples from its own RNG stream by
design; so the runs decode greedily (``rollout.temperature = 0``), which makes every completion a function
of the weights and the prompt alone. Equal per-step losses over two steps then also prove the gradients:
step 2's loss is computed on the weights the summed step-1 gradient produced.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from opd_fast.runner.checkpoint import checkpoints
from opd_fast.runner.config import RunConfig
from opd_fast.runner.distributed import DataParallel, check_config, rank_seed
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.trainer import train

TIMEOUT_S = 120  # the spawned group is killed past this: a hang fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, runs: list[tuple[str, RunConfig, int | None]], results: str) -> None:
    """One torchrun-like rank: the environment torchrun would set, then each run; an error is a result."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out: dict[str, object] = {}
    for name, config, stop_after in runs:
        try:
            out[name] = train(config, stop_after=stop_after)
        except Exception as exc:  # the test asserts which error each rank saw
            out[name] = f"{type(exc).__name__}: {exc}"
    Path(results, f"rank{rank}.json").write_text(json.dumps(out))


def _spawn(world: int, runs: list[tuple[str, RunConfig, int | None]], results: Path) -> list[dict]:
    ctx = mp.spawn(_rank, args=(world, _free_port(), runs, str(results)), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process run did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(world)]


COMPARED = ("loss", "tokens", "completion_len", "truncation_rate", "student_entropy", "grad_norm", "lr")
PER_KEY = ("divergence/", "token_share/", "entropy/teacher/")  # per teacher and domain drawn


def test_two_processes_match_one_and_resume_in_one(make_config, tmp_path: Path) -> None:
    sections = {"rollout": {"temperature": 0.0}, "loss": {"sft_weight": 0.5},
                "optim": {"steps": 3, "schedule": "constant", "warmup_steps": 0},
                "metrics": {"progress": False, "tensorboard": False, "samples_every": 1}}
    bad = make_config(tmp_path / "bad", **{**sections, "data": {"prompts_per_step": 3}})
    dp_config = make_config(tmp_path / "dp", **sections)
    blocked = make_config(tmp_path / "blocked", **{**sections, "optim": {**sections["optim"], "steps": 1}})
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "checkpoints").write_text("")  # rank 0's checkpoint write fails
    results = tmp_path / "results"
    results.mkdir()
    ranks = _spawn(2, [("bad", bad, None), ("dp", dp_config, 2), ("blocked", blocked, None)], results)

    for r, out in enumerate(ranks):  # refused on every rank, before any collective (so nothing hangs)
        assert out["bad"].startswith("ValueError") and "data.prompts_per_step" in out["bad"], (r, out["bad"])
        assert "world size 2" in out["bad"]
    assert ranks[0]["blocked"].startswith("FileExistsError")  # a rank-0 failure reaches every rank
    assert ranks[1]["blocked"].startswith("RuntimeError: rank 0 failed: FileExistsError")
    assert ranks[0]["dp"] == {**ranks[1]["dp"], "steps_per_s": ranks[0]["dp"]["steps_per_s"],
                              "tokens_per_s": ranks[0]["dp"]["tokens_per_s"]}
    dp_dir = tmp_path / "dp"
    assert [r["step"] for r in read_metrics(dp_dir)] == [1, 2]  # one row per step: rank 0 alone writes
    assert [p.name for p in checkpoints(dp_dir)] == ["step-00000002"]
    assert len((dp_dir / "config_history.jsonl").read_text().splitlines()) == 1
    assert {r["step"] for r in read_metrics(dp_dir, "samples.jsonl")} == {1, 2}

    one = train(make_config(tmp_path / "one", **sections))
    assert one["steps"] == 3
    resumed = train(dp_config, resume=True)  # the 2-process checkpoint, continued in one process
    assert resumed["steps_run"] == 1
    expected = read_metrics(tmp_path / "one")
    got = read_metrics(dp_dir)
    assert [r["step"] for r in got] == [1, 2, 3]
    for want, row in zip(expected, got, strict=True):
        per_key = sorted(k for k in want if k.startswith(PER_KEY))
        assert per_key == sorted(k for k in row if k.startswith(PER_KEY)) and per_key
        for key in (*COMPARED, *per_key):
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (row["step"], key)


@pytest.mark.parametrize(("sections", "key"), [
    ({"data": {"prompts_per_step": 3}}, "data.prompts_per_step"),
    ({"run": {"max_staleness": 1}}, "run.max_staleness"),
    ({"loss": {"reward_models": {"a": "some/reward-model"}, "verifier_weight": 0.5}}, "loss.reward_models"),
    ({"rollout": {"correction": {"topk": 2}}}, "rollout.correction"),
    ({"run": {"device": "mps"}}, "run.device"),
    ({"run": {"device": "cuda:1"}}, "run.device"),
])
def test_refused_with_more_than_one_process(make_config, tmp_path: Path, sections: dict, key: str) -> None:
    config = make_config(tmp_path, **sections)
    check_config(config, 1)  # one process: nothing to refuse
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_config(config, 2)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_tile_the_step_batch_in_rank_order(world: int) -> None:
    batch = list(range(8))
    shards = [DataParallel(world, r).shard(batch) for r in range(world)]
    assert [x for s in shards for x in s] == batch
    assert {len(s) for s in shards} == {8 // world}


def test_rank_seeds() -> None:
    assert rank_seed(7, 0, 0) == rank_seed(7, 0, 5) == 7  # rank 0: the one-process stream, restored on resume
    seeds = {rank_seed(7, r, s) for r in (1, 2) for s in (0, 5)}
    assert len(seeds) == 4 and 7 not in seeds  # other ranks: their own streams, fresh after a resume
