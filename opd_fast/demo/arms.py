"""The demo's arms: the same initial student, the same budget, different training signals.

Every distillation arm is one ``opd_fast.runner`` run: a ``RunConfig`` built here from the profile plus
the arm's ``loss`` settings, trained with ``opd_fast.runner.trainer.train``. The runner's
``off_policy_fraction`` is the fraction of steps trained on off-policy completions (dataset references or
teacher samples), so on-policy arms have ``off_policy_fraction=0`` and the supervised / sequence-level KD
arms ``off_policy_fraction=1``. The SFT arm has
no teacher term, which the runner cannot switch off, so it uses the demo's SFT loop (``sft.train_sft``)
with the runner's optimizer settings and schedule at the same step count and batch size, on the data the
initial student was trained on (ground truth with the profile's small share of retry demonstrations).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..models.tiny import save_model
from ..runner.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    MetricsConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    RunSection,
    StudentConfig,
    TeacherConfig,
    validate_config,
)
from ..runner.evaluate import evaluate_run
from ..runner.metrics import read_metrics
from ..runner.models import load_model
from ..runner.trainer import train
from ..tasks.column_add import ColumnAdd
from .profiles import Profile
from .report import ArmResult
from .sft import train_sft


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig fields; empty for SFT
    sft: bool = False


ARMS: tuple[Arm, ...] = (
    Arm("sft", "SFT on ground truth", sft=True),
    Arm("supervised_kd", "supervised KD (fwd KL on ground truth)",
        {"off_policy_fraction": 1.0, "off_policy_source": "dataset", "divergence": "forward_kl"}),
    Arm("seqkd", "SeqKD (fwd KL on teacher samples)",
        {"off_policy_fraction": 1.0, "off_policy_source": "teacher", "divergence": "forward_kl"}),
    Arm("on_policy_fkl", "on-policy fwd KL", {"off_policy_fraction": 0.0, "divergence": "forward_kl"}),
    Arm("on_policy_rkl", "on-policy rev KL", {"off_policy_fraction": 0.0, "divergence": "reverse_kl"}),
    Arm("on_policy_jsd", "on-policy JSD(0.5)", {"off_policy_fraction": 0.0, "divergence": "jsd", "beta": 0.5}),
    Arm("mixed_rkl", "mixed: 50% ground truth, rev KL",
        {"off_policy_fraction": 0.5, "off_policy_source": "dataset", "divergence": "reverse_kl"}),
)
DEFAULT_ARMS = tuple(a.name for a in ARMS if a.name != "mixed_rkl")
ARMS_BY_NAME = {a.name: a for a in ARMS}
# One intra-op thread: the demo's models are tiny, and on shared cores torch's thread pool makes each
# small matmul wait for a busy core (the runner measured ~100x slower steps).
THREADS = 1


def run_config(arm: Arm, profile: Profile, student: Path, teacher: Path, out: Path, seed: int) -> RunConfig:
    """The runner configuration of one arm (the SFT arm uses its optimizer, data and eval sections too)."""
    evals = max(1, profile.eval_points)
    config = RunConfig(
        run=RunSection(out_dir=str(out), seed=seed, threads=THREADS),
        student=StudentConfig(path=str(student)),
        teachers={"main": TeacherConfig(path=str(teacher))},
        data=DataConfig(task="column_add", num_prompts=profile.train_prompts, prompts_per_step=profile.arm_batch,
                        group_size=1, sampler="uniform"),
        rollout=RolloutConfig(max_new_tokens=profile.max_new_tokens, temperature=1.0,
                              micro_batch_size=profile.arm_batch),
        loss=replace(LossConfig(), **arm.loss),
        optim=OptimConfig(steps=profile.arm_steps, lr=profile.arm_lr,
                          warmup_steps=min(profile.arm_warmup, profile.arm_steps // 2)),
        checkpoint=CheckpointConfig(every=0, keep=1),
        metrics=MetricsConfig(progress=True, tensorboard=False),
        eval=EvalConfig(every=max(1, profile.arm_steps // evals) if evals > 1 else 0,
                        num_prompts=profile.eval_prompts),
    )
    validate_config(config)
    return config


def _result(arm: Arm, seed: int, evaluation: dict[str, float], curve: list[tuple[int, float]], scored: int,
            generated: int, grad: int, wall: float) -> ArmResult:
    return ArmResult(arm=arm.name, label=arm.label, seed=seed, greedy_accuracy=evaluation["greedy/accuracy"],
                     sampled_accuracy=evaluation["sampled/accuracy"], reverse_kl=evaluation["reverse_kl"],
                     teacher_scored_tokens=scored, teacher_generated_tokens=generated, student_grad_tokens=grad,
                     wall_s=wall, curve=curve)


def _run_distill(arm: Arm, config: RunConfig) -> ArmResult:
    t0 = time.perf_counter()
    summary = train(config, overwrite=True)  # a re-run of the demo replaces its previous arm runs
    wall = time.perf_counter() - t0
    rows = read_metrics(config.run.out_dir)
    scored = generated = 0
    tokens_at: dict[int, int] = {}
    for row in rows:
        if row.get("kind") == "eval":
            continue
        scored += row["tokens"]
        generated += row["tokens"] if row["source"] == "teacher" else 0
        tokens_at[row["step"]] = scored
    curve = [(tokens_at[r["step"]], r["sampled/accuracy"]) for r in rows if r.get("kind") == "eval"]
    return _result(arm, config.run.seed, summary["eval"], curve, scored, generated, scored, wall)


def _run_sft(arm: Arm, config: RunConfig, profile: Profile) -> ArmResult:
    t0 = time.perf_counter()
    lm = load_model(config.student.path, name="student", trainable=True)
    task = ColumnAdd(profile.digits)
    pool = task.examples("train", profile.train_prompts, config.run.seed)  # the runner arms' prompt pool
    o = config.optim
    _, tokens = train_sft(
        lm, lambda step: [pool[(step * profile.arm_batch + i) % len(pool)] for i in range(profile.arm_batch)],
        steps=o.steps, lr=o.lr, retry_rate=profile.student_retry_rate, seed=config.run.seed, warmup=o.warmup_steps,
        min_lr_ratio=o.min_lr_ratio, desc=arm.name,
    )
    final = Path(config.run.out_dir) / "student"
    save_model(lm.model, lm.tokenizer, final)
    wall = time.perf_counter() - t0
    evaluation = evaluate_run(replace(config, student=StudentConfig(path=str(final))))
    return _result(arm, config.run.seed, evaluation, [], 0, 0, tokens, wall)


def run_arm(arm: Arm, profile: Profile, student: Path, teacher: Path, out: Path, seed: int) -> ArmResult:
    """Train one arm from the shared initial student and evaluate it on the held-out split."""
    config = run_config(arm, profile, student, teacher, out, seed)
    return _run_sft(arm, config, profile) if arm.sft else _run_distill(arm, config)
