"""Async mode: bounded run-ahead rollouts on a student snapshot, staleness accounting, importance weights."""

import time
from pathlib import Path

import pytest
import torch

from opd_fast.runner.async_rollout import RolloutProducer, StepRollouts
from opd_fast.runner.checkpoint import latest_checkpoint, load_state
from opd_fast.runner.config import RolloutConfig
from opd_fast.runner.data import Prompt
from opd_fast.runner.learn import ImportanceWeights
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.models import LoadedModel, forward_hidden, load_model
from opd_fast.runner.rollout import rollout
from opd_fast.runner.trainer import Trainer, train

COMPARED = ("loss", "grad_norm", "tokens", "completion_len", "divergence/teacher/ta", "divergence/teacher/tb")


def step_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("kind") != "eval"]


@pytest.mark.parametrize("handoff", [0.0, 0.5])  # with early groups, the producer's batches carry them to scoring
def test_lockstep_producer_gives_the_strict_losses(make_config, tmp_path: Path, handoff: float) -> None:
    """With staleness 0 the producer's snapshot, weight hand-off and RNG use change nothing: bit for bit."""
    runs = {}
    for mode in ("strict", "async"):
        config = make_config(tmp_path / mode, run={"pipeline": "strict", "seed": 5}, optim={"steps": 3},
                             data={"prompts_per_step": 3, "group_size": 2}, rollout={"handoff_fraction": handoff})
        trainer = Trainer(config)
        if mode == "strict":
            runs[mode] = [trainer.train_step() for _ in range(3)]
            continue
        with RolloutProducer(trainer.roll_out, trainer.student, start=0, last=3, max_staleness=0,
                             threads=1) as trainer.producer:
            runs[mode] = [trainer.train_step() for _ in range(3)]
    assert any(r["early_scored_share"] > 0 for r in runs["async"]) == (handoff > 0)
    for a, b in zip(runs["strict"], runs["async"], strict=True):
        assert {k: a.get(k) for k in COMPARED} == {k: b.get(k) for k in COMPARED}


class _Versioned(torch.nn.Module):
    """A stand-in student whose one weight holds the number of updates it has had."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))


def test_producer_runs_exactly_max_staleness_ahead_and_samples_the_version_it_reports() -> None:
    model = _Versioned()
    student = LoadedModel("student", model, model, None, "")
    seen: list[tuple[int, float]] = []

    def roll(step: int, lm: LoadedModel) -> StepRollouts:
        seen.append((step, float(lm.model.weight.detach())))
        return StepRollouts(step, False, [[Prompt(step, "", "d", None)] * 2], [], version=-1)

    with RolloutProducer(roll, student, start=0, last=6, max_staleness=2, threads=1) as producer:
        plans = [producer.take() for _ in range(3)]  # steps 1..3 need only version 0
        time.sleep(0.2)
        assert producer.in_flight_samples == 0 and len(seen) == 3  # step 4 waits for version 1
        for version in (1, 2, 3):
            with torch.no_grad():
                model.weight.fill_(version)
            producer.publish(version)
            plans.append(producer.take())
    assert [p.step for p in plans] == [1, 2, 3, 4, 5, 6]
    assert [p.version for p in plans] == [0, 0, 0, 1, 2, 3]
    assert [w for _, w in seen] == [0, 0, 0, 1, 2, 3]  # the snapshot held the version it reports
    assert all((p.step - 1) - p.version <= 2 for p in plans)


def test_producer_errors_reach_the_learner() -> None:
    model = _Versioned()

    def roll(step: int, lm: LoadedModel) -> StepRollouts:
        raise RuntimeError("rollout failed")

    with RolloutProducer(roll, LoadedModel("s", model, model, None, ""), start=0, last=2, max_staleness=1,
                         threads=1) as producer, pytest.raises(RuntimeError, match="rollout failed"):
        producer.take()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_importance_weights_are_one_on_the_sampler_weights(models: dict, temperature: float) -> None:
    student = load_model(models["student"])
    prompts = [Prompt(i, p, "a", None) for i, p in enumerate(["abc=", "head=", "fa="])]
    batch = rollout(student, prompts, RolloutConfig(max_new_tokens=5, temperature=temperature),
                    torch.Generator().manual_seed(0))
    hidden, _ = forward_hidden(student, batch.input_ids, batch.attention_mask)
    weights = ImportanceWeights(clip=10.0, temperature=temperature)(batch, batch.target_states(hidden), student.head)
    assert weights.shape == (batch.num_tokens,)
    torch.testing.assert_close(weights, torch.ones_like(weights), atol=1e-5, rtol=0)  # fp32 rounding only
    batch.sampler_logprobs -= 5.0  # tokens the sampler found far less likely: ratio e^5, truncated
    clipped = ImportanceWeights(clip=2.0, temperature=temperature)(batch, batch.target_states(hidden), student.head)
    assert torch.equal(clipped, torch.full_like(clipped, 2.0))


def test_async_resume_drops_and_counts_the_in_flight_rollouts(make_config, tmp_path: Path) -> None:
    opts = {"run": {"max_staleness": 1, "threads": 2}, "optim": {"steps": 4},
            "loss": {"signal": "sampled"}, "data": {"prompts_per_step": 2, "group_size": 2}}
    train(make_config(tmp_path / "run", **opts), stop_after=2)
    state = load_state(latest_checkpoint(tmp_path / "run"))
    in_flight = state["in_flight_samples"]
    assert in_flight in (0, 4, 8)  # at most max_staleness + 1 = 2 steps of 4 samples rolled out ahead
    first = step_rows(tmp_path / "run")
    assert [r["async/dropped_samples"] for r in first] == [0, 0]
    assert first[0]["async/staleness"] == 0  # step 1 can only sample the initial weights
    summary = train(make_config(tmp_path / "run", **opts), resume=True)
    assert summary["steps"] == 4 and summary["steps_run"] == 2
    rows = step_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["async/dropped_samples"] for r in rows[2:]] == [in_flight] * 2
    for row in rows:
        assert 0 <= row["async/staleness"] <= 1
        assert 0 < row["async/importance_weight"] <= 2.0  # sampled-token signal: weighted, truncated at 2


@pytest.mark.parametrize(("run", "key"), [({"max_staleness": -1}, "run.max_staleness"),
                                          ({"importance_clip": -0.5}, "run.importance_clip")])
def test_async_keys_are_range_checked(make_config, tmp_path: Path, run: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}' must be >= 0"):
        make_config(tmp_path, run=run)


def test_importance_weights_need_plain_sampling(make_config, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'run\.importance_clip' needs plain sampling"):
        make_config(tmp_path, run={"max_staleness": 1}, loss={"signal": "sampled"}, rollout={"top_k": 3})
    config = make_config(tmp_path, run={"max_staleness": 1, "importance_clip": 0.0}, loss={"signal": "sampled"},
                         rollout={"top_k": 3})
    assert config.run.importance_clip == 0.0
    make_config(tmp_path, run={"max_staleness": 1}, rollout={"top_k": 3})  # full-vocab KD: nothing is weighted


@pytest.mark.parametrize("sections", [
    {},
    {"student": {"lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}}},
    {"loss": {"off_policy_fraction": 0.5, "off_policy_source": "teacher"}},  # teachers sample on the producer
], ids=["full", "lora", "teacher-samples"])
def test_the_snapshot_samples_with_the_published_weights(make_config, tmp_path: Path, sections: dict) -> None:
    if "student" in sections:
        pytest.importorskip("peft")
    config = make_config(tmp_path, run={"max_staleness": 1}, optim={"steps": 3}, **sections)
    trainer = Trainer(config)
    initial = {n: p.detach().clone() for n, p in trainer.student.model.named_parameters() if p.requires_grad}
    with trainer.run_ahead():
        rows = [trainer.train_step() for _ in range(3)]
        snapshot = dict(trainer.producer.snapshot.model.named_parameters())
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["async/staleness"] <= 1 for r in rows) and rows[0]["async/staleness"] == 0
    # step 3 could only start from version >= 1: the snapshot's trainable weights moved off the initial ones
    assert any(not torch.equal(snapshot[n], p) for n, p in initial.items())
    assert trainer.producer is None
