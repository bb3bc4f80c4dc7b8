"""Data-parallel training (``runner.distributed``): 2 gloo processes against one process.

The comparison needs the same rollouts on both sides, but each rank samples from its own RNG stream by
design; so the runs decode greedily (``rollout.temperature = 0``), which makes every completion a function
of the weights and the prompt alone. Equal per-step losses over two steps then also prove the gradients:
step 2's loss is computed on the weights the summed step-1 gradient produced.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ranks import DEVICE, Run, assert_same_steps, run_ranks

from opd_fast.runner.checkpoint import checkpoints
from opd_fast.runner.distributed import DataParallel, check_config, rank_seed
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.trainer import train


def test_two_processes_match_one_and_resume_in_one(make_config, tmp_path: Path) -> None:
    sections = {"run": {"device": DEVICE}, "rollout": {"temperature": 0.0}, "loss": {"sft_weight": 0.5},
                "optim": {"steps": 3, "schedule": "constant", "warmup_steps": 0},
                "metrics": {"progress": False, "tensorboard": False, "samples_every": 1}}
    bad = make_config(tmp_path / "bad", **{**sections, "data": {"prompts_per_step": 3}})
    dp_config = make_config(tmp_path / "dp", **sections)
    blocked = make_config(tmp_path / "blocked", **{**sections, "optim": {**sections["optim"], "steps": 1}})
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "checkpoints").write_text("")  # rank 0's checkpoint write fails
    ranks = run_ranks(2, [Run("bad", bad), Run("dp", dp_config, {"stop_after": 2}), Run("blocked", blocked)],
                      tmp_path / "results")

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
    assert [r["step"] for r in read_metrics(dp_dir)] == [1, 2, 3]
    assert_same_steps(read_metrics(tmp_path / "one"), read_metrics(dp_dir))


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
