"""Routing and per-teacher calibration: a mixed batch split over teachers of different widths and head
sizes, each teacher's own weight and temperature, and the per-teacher metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd_fast.reference import divergence_from_logits
from opd_fast.runner.config import LossConfig, OptimConfig, RolloutConfig
from opd_fast.runner.data import Prompt
from opd_fast.runner.learn import Learner
from opd_fast.runner.models import Teacher, check_compatible, load_model, position_ids
from opd_fast.runner.rollout import rollout
from opd_fast.runner.score import Router, score
from opd_fast.runner.trainer import Trainer

PROMPTS = [Prompt(0, "abc=", "a", None), Prompt(1, "a=", "b", None), Prompt(2, "hhgg fed=", "b", None),
           Prompt(3, "fa=", "a", None), Prompt(4, "dead=", "b", None)]
def full_logits(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.logits[:, :-1][target]


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_mixed_batch_loss_is_the_sum_of_per_teacher_losses(models: dict, padded_teacher: str, divergence: str) -> None:
    student = load_model(models["student"], name="student", trainable=True)
    calibration = {"ta": (models["teacher_a"], ["a"], 2.0, 2.0), "tb": (padded_teacher, ["b"], 0.5, None)}
    teachers = {}
    for name, (path, domains, weight, temperature) in calibration.items():
        model = load_model(path, name=name)
        teachers[name] = Teacher(model, check_compatible(student, model), weight, domains, temperature)
    assert teachers["tb"].head.weight.shape[0] == teachers["tb"].vocab_size + 6
    assert {t.head.weight.shape[1] for t in teachers.values()} == {48, 64}
    loss_cfg = LossConfig(divergence=divergence, beta=0.3, temperature=1.5)
    router = Router(teachers)
    batch = rollout(student, PROMPTS, RolloutConfig(max_new_tokens=7), torch.Generator().manual_seed(0))
    num_items = float(batch.num_tokens)
    stats = Learner(student, loss_cfg, OptimConfig(), teachers).micro_step(
        score(batch, teachers, router, temperature=loss_cfg.temperature), num_items)
    grad = student.head.weight.grad.clone()

    student.model.zero_grad()
    expected = torch.zeros((), dtype=torch.float64)
    for name, rows in router.route([p.domain for p in PROMPTS]).items():  # each teacher's rows on their own
        idx, teacher = torch.tensor(rows), teachers[name]
        ids, mask, target = batch.input_ids[idx], batch.attention_mask[idx], batch.target_mask[idx]
        temperature = loss_cfg.temperature if teacher.temperature is None else teacher.temperature
        s_logits = full_logits(student, ids, mask, target).double() / temperature
        with torch.no_grad():
            t_logits = full_logits(teacher.model, ids, mask, target)[:, :teacher.vocab_size].double() / temperature
        div = divergence_from_logits(s_logits, t_logits, divergence, beta=0.3)
        expected = expected + teacher.weight * div.sum() / num_items
        entropy = -(torch.log_softmax(s_logits, -1).exp() * torch.log_softmax(s_logits, -1)).sum(-1)
        assert stats.teacher_tokens[name] == div.numel()
        assert stats.divergence_sum[f"teacher/{name}"] == pytest.approx(float(div.detach().sum()), rel=1e-4)
        assert stats.teacher_entropy_sum[name] == pytest.approx(float(entropy.detach().sum()), rel=1e-4)
    expected.backward()
    assert stats.loss == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(grad, student.head.weight.grad, atol=1e-5, rtol=1e-3)


def test_per_teacher_metrics_are_logged_and_consistent(models: dict, make_config, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, teachers={"ta": {"path": models["teacher_a"], "domains": ["a"], "temperature": 2.0}})
    trainer = Trainer(cfg)
    assert (trainer.teachers["ta"].temperature, trainer.teachers["tb"].temperature) == (2.0, None)
    row = trainer.train_step()
    shares = {name: row[f"token_share/teacher/{name}"] for name in ("ta", "tb")}
    assert sum(shares.values()) == pytest.approx(1.0)
    mixed = sum(shares[name] * row[f"entropy/teacher/{name}"] for name in shares)  # token-weighted average
    assert mixed == pytest.approx(row["student_entropy"], rel=1e-6)
    assert {f"divergence/teacher/{name}" for name in shares} <= set(row)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_teacher_temperature_must_be_positive(make_config, tmp_path: Path, temperature: float) -> None:
    with pytest.raises(ValueError, match=r"teachers\.ta\.temperature"):
        make_config(tmp_path, teachers={"ta": {"path": "x", "temperature": temperature}})
