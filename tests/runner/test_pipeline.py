"""Strict pipelining: the same computation as the serial loop, only overlapped."""

import threading
from pathlib import Path

import pytest
import torch

from opd_fast.runner.pipeline import StageWorker, split_threads
from opd_fast.runner.trainer import Trainer

COMPARED = ("loss", "grad_norm", "tokens", "completion_len", "early_scored_share", "divergence/teacher/ta",
            "divergence/teacher/tb")


WORKER, MAIN = "worker", "main"


def recording(stage, lanes: set[str]):
    """``stage`` that adds the lane (thread) it ran on to ``lanes``."""
    def run(*args):
        lanes.add(MAIN if threading.current_thread() is threading.main_thread() else WORKER)
        return stage(*args)
    return run


@pytest.mark.parametrize(("loss", "rollout", "strict_lanes"), [
    ({}, {}, {WORKER}),  # 3 micro-batches per step, so scoring of one overlaps the rollout of the next
    ({}, {"handoff_fraction": 0.5}, {WORKER}),  # ... and rows that finish early are scored before the rest
    # one micro-batch: the prompts' prefill and the rows that finish early beside decoding, the rest after it
    ({}, {"micro_batch_size": 6, "handoff_fraction": 0.25}, {WORKER, MAIN}),
    ({}, {"micro_batch_size": 6}, {MAIN}),  # ... or without early groups nothing overlaps: the serial loop
    ({"off_policy_fraction": 0.5, "off_policy_source": "teacher"}, {}, {WORKER}),
    ({"signal": "topk", "topk": 4, "divergence": "forward_kl"}, {"micro_batch_size": 3, "max_new_tokens": 10},
     {WORKER}),
])
def test_strict_pipeline_gives_the_serial_losses(make_config, tmp_path: Path, loss: dict, rollout: dict,
                                                 strict_lanes: set[str]) -> None:
    runs = {}
    for mode in ("serial", "strict"):
        config = make_config(tmp_path / mode, run={"pipeline": mode, "seed": 3}, loss=loss, optim={"steps": 3},
                             data={"prompts_per_step": 3, "group_size": 2}, rollout=rollout)
        trainer = Trainer(config)
        scored_on = set()
        for name in ("score_batch", "prefill_batch"):
            setattr(trainer, name, recording(getattr(trainer, name), scored_on))
        rows = [trainer.train_step() for _ in range(3)]
        assert scored_on == (strict_lanes if mode == "strict" else {MAIN})
        runs[mode] = (rows, [p.detach().clone() for p in trainer.student.model.parameters()])
    (serial, w_serial), (strict, w_strict) = runs["serial"], runs["strict"]
    if config.rollout.handoff_fraction > 0 and not loss:
        assert any(r["early_scored_share"] > 0 for r in serial)  # rows did finish early (this seed)
    for a, b in zip(serial, strict, strict=True):
        assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}
    assert all(torch.equal(x, y) for x, y in zip(w_serial, w_strict, strict=True))


def test_learning_gets_every_thread_once_scoring_is_done(make_config, tmp_path: Path) -> None:
    config = make_config(tmp_path, run={"threads": 2}, data={"prompts_per_step": 2, "group_size": 2})
    trainer = Trainer(config)
    threads, micro_step = [], trainer.learner.micro_step

    def record(*args, **kwargs):
        threads.append(torch.get_num_threads())
        return micro_step(*args, **kwargs)

    trainer.learner.micro_step = record
    trainer.train_step()
    assert threads == [1, 2]  # beside the scorer: its share only; after the last score: all of run.threads


def test_stage_worker_keeps_order_and_reraises() -> None:
    threads = []

    def work(x: int) -> int:
        threads.append(threading.current_thread())
        if x == 3:
            raise ValueError("bad item 3")
        return x * x

    with StageWorker(work, threads=1) as worker:
        for x in range(5):
            worker.submit(x)
        assert [worker.result() for _ in range(3)] == [0, 1, 4]
        with pytest.raises(ValueError, match="bad item 3"):
            worker.result()
        assert worker.result() == 16
    assert threading.main_thread() not in threads


def test_stage_worker_blocks_submit_beyond_its_depth() -> None:
    started, release = threading.Event(), threading.Event()

    def work(x: int) -> int:
        started.set()
        release.wait()
        return x

    with StageWorker(work, threads=1, depth=2) as worker:
        worker.submit(0)
        started.wait()  # item 0 is being worked on; two more may wait
        worker.submit(1)
        worker.submit(2)
        blocked = threading.Thread(target=worker.submit, args=(3,))
        blocked.start()
        blocked.join(timeout=0.2)
        assert blocked.is_alive()  # the bounded queue holds the producer back
        release.set()
        blocked.join()
        assert [worker.result() for _ in range(4)] == [0, 1, 2, 3]


def test_thread_split_never_exceeds_the_budget() -> None:
    assert split_threads(1) == (1, 1)
    assert split_threads(2) == (1, 1)
    assert split_threads(8) == (6, 2)
    assert all(sum(split_threads(t)) == t for t in range(2, 33))
