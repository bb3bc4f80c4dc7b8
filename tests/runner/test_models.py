"""Student and teacher dtypes (fp32 master weights, bf16 compute under autocast) and gradient checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd_fast.runner.config import LossConfig, OptimConfig, RolloutConfig
from opd_fast.runner.data import Prompt
from opd_fast.runner.learn import Learner
from opd_fast.runner.models import Teacher, forward_hidden, load_model, load_run_models
from opd_fast.runner.rollout import rollout
from opd_fast.runner.score import Router, score
from opd_fast.runner.trainer import train

PROMPTS = [Prompt(0, "abc=", "a", None), Prompt(1, "hhgg fed=", "a", None)]


@pytest.mark.parametrize(("run", "student", "teacher", "weights"), [
    ("float32", "", "", (torch.float32, torch.float32, torch.float32)),
    ("bfloat16", "", "", (torch.float32, torch.bfloat16, torch.bfloat16)),  # fp32 master weights, bf16 compute
    ("bfloat16", "bfloat16", "float32", (torch.bfloat16, torch.bfloat16, torch.float32)),  # pure bf16 student
])
def test_student_master_and_compute_dtypes_and_teacher_dtype(make_config, models: dict[str, str], tmp_path: Path,
                                                             run: str, student: str, teacher: str,
                                                             weights: tuple) -> None:
    config = make_config(tmp_path, run={"dtype": run}, student={"path": models["student"], "dtype": student},
                         teachers={"ta": {"path": models["teacher_a"], "domains": ["a"], "dtype": teacher}})
    lm, teachers = load_run_models(config)
    assert (lm.head.weight.dtype, lm.compute_dtype, teachers["ta"].head.weight.dtype) == weights
    ids = torch.tensor([[1, 2, 3]])
    hidden, _ = forward_hidden(lm, ids, torch.ones_like(ids))
    with lm.autocast():
        inner = torch.ones(2, 2) @ torch.ones(2, 2)
    autocasts = weights[0] != weights[1]  # only fp32 master weights with a bf16 compute dtype need autocast
    assert inner.dtype == (torch.bfloat16 if autocasts else torch.float32)  # what the loss computes in
    assert hidden.isfinite().all()


def test_one_bf16_step_keeps_fp32_master_weights(make_config, tmp_path: Path) -> None:
    summary = train(make_config(tmp_path / "run", run={"dtype": "bfloat16"}, optim={"steps": 1}))
    assert summary["steps"] == 1 and torch.isfinite(torch.tensor(summary["final_loss"]))
    saved = load_model(str(Path(summary["checkpoint"]) / "student"))
    assert saved.head.weight.dtype == torch.float32


def test_fp16_student_weights_are_refused_for_training(make_config, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'student\.dtype' = 'float16' would train the student's weights in pure"):
        train(make_config(tmp_path / "run", student={"dtype": "float16"}))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(models: dict[str, str]) -> None:
    teacher = load_model(models["teacher_a"], name="ta")
    results = []
    for checkpointing in (False, True):
        student = load_model(models["student"], name="student", trainable=True, gradient_checkpointing=checkpointing)
        assert any(getattr(m, "gradient_checkpointing", False) for m in student.model.modules()) is checkpointing
        teachers = {"ta": Teacher(teacher, student.head.weight.shape[0])}
        batch = rollout(student, PROMPTS, RolloutConfig(max_new_tokens=5), torch.Generator().manual_seed(0))
        learner = Learner(student, LossConfig(), OptimConfig(), teachers)
        stats = learner.micro_step(score(batch, teachers, Router(teachers)), float(batch.num_tokens))
        grads = {n: p.grad.clone() for n, p in student.model.named_parameters()}
        results.append((stats.loss, grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
