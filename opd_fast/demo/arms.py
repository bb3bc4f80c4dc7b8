"""The demo's arms: the same initial student, the same budget, different training signals.

Every distillation arm is one ``opd_fast.runner`` run over both domains: mixed batches (``data.mixture``,
equal weights) of the prompt files ``domains.write_prompts`` wrote, each row routed to its domain's
specialist (``teachers.<domain>.domains``), a ``RunConfig`` built here from the profile plus the arm's
``loss`` settings, trained with ``opd_fast.runner.trainer.train``. The runner's ``off_policy_fraction``
is the fraction of steps trained on off-policy completions (dataset references or teacher samples), so
on-policy arms have ``off_policy_fraction=0`` and the supervised / sequence-level KD arms
``off_policy_fraction=1``. The corrected arm is on-policy reverse KL whose rollouts the routed teacher
corrects (``rollout.correction``, handing control back to the student over the arm's steps). The SFT arm
has no teacher term, which the runner cannot switch off, so it uses the demo's SFT loop
(``sft.train_sft``) with the runner's optimizer settings and schedule at the same step count and batch
size, on the same prompt pool (references, with the start's small share of retry demonstrations).
"""

from __future__ import annotations

import random
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
from ..runner.data import read_examples
from ..runner.evaluate import evaluate_run
from ..runner.metrics import read_metrics
from ..runner.models import load_model
from ..runner.trainer import train
from .domains import DOMAINS
from .profiles import Profile
from .report import ArmResult
from .sft import train_sft


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig fields; empty for SFT
    sft: bool = False
    corrected: bool = False  # teacher-corrected rollouts (profile.correction)

    @property
    def off_policy(self) -> bool:
        """Trained only on completions the student did not sample: the baselines on-policy arms must beat."""
        return self.sft or self.loss.get("off_policy_fraction", 0.0) == 1.0


@dataclass(frozen=True)
class DemoData:
    """The run's prompt files (both domains, a ``domain`` per line), shared by every seed and arm so that
    arms are compared on the same held-out prompts."""

    train: Path
    eval: Path


ARMS: tuple[Arm, ...] = (
    Arm("sft", "SFT on references", sft=True),
    Arm("supervised_kd", "supervised KD (fwd KL on references)",
        {"off_policy_fraction": 1.0, "off_policy_source": "dataset", "divergence": "forward_kl"}),
    Arm("seqkd", "SeqKD (fwd KL on teacher samples)",
        {"off_policy_fraction": 1.0, "off_policy_source": "teacher", "divergence": "forward_kl"}),
    Arm("on_policy_fkl", "on-policy fwd KL", {"off_policy_fraction": 0.0, "divergence": "forward_kl"}),
    Arm("on_policy_rkl", "on-policy rev KL", {"off_policy_fraction": 0.0, "divergence": "reverse_kl"}),
    Arm("on_policy_jsd", "on-policy JSD(0.5)", {"off_policy_fraction": 0.0, "divergence": "jsd", "beta": 0.5}),
    Arm("corrected_rkl", "on-policy rev KL, teacher-corrected rollouts",
        {"off_policy_fraction": 0.0, "divergence": "reverse_kl"}, corrected=True),
    Arm("mixed_rkl", "mixed: 50% references, rev KL",
        {"off_policy_fraction": 0.5, "off_policy_source": "dataset", "divergence": "reverse_kl"}),
)
ARMS_BY_NAME = {a.name: a for a in ARMS}
DEFAULT_ARMS = ("sft", "supervised_kd", "seqkd", "on_policy_rkl", "on_policy_jsd")
# The weak student: the off-policy baselines and plain on-policy reverse KL at a larger capacity gap, and the
# rescue (the same on-policy arm with teacher-corrected rollouts).
WEAK_ARMS = ("sft", "supervised_kd", "seqkd", "on_policy_rkl", "corrected_rkl")
# One intra-op thread: the demo's models are tiny, and on shared cores torch's thread pool makes each
# small matmul wait for a busy core (the runner measured ~100x slower steps).
THREADS = 1


def run_config(arm: Arm, profile: Profile, student: Path, teachers: dict[str, Path], data: DemoData, out: Path,
               seed: int) -> RunConfig:
    """The runner configuration of one arm (the SFT arm uses its optimizer, data and eval sections too).
    ``teachers`` maps each domain to its specialist; each becomes a teacher routed that domain only."""
    correction = profile.correction if arm.corrected else None
    config = RunConfig(
        run=RunSection(out_dir=str(out), seed=seed, threads=THREADS),
        student=StudentConfig(path=str(student)),
        teachers={domain: TeacherConfig(path=str(path), domains=[domain]) for domain, path in teachers.items()},
        data=DataConfig(prompts=str(data.train), eval_prompts=str(data.eval),
                        mixture={d.name: 1.0 for d in DOMAINS}, prompts_per_step=profile.arm_batch, group_size=1,
                        sampler="uniform"),
        rollout=RolloutConfig(max_new_tokens=profile.max_new_tokens, temperature=1.0,
                              micro_batch_size=profile.arm_batch, correction=correction),
        loss=replace(LossConfig(), **arm.loss, verifiers={d.name: d.verifier for d in DOMAINS}),
        optim=OptimConfig(steps=profile.arm_steps, lr=profile.arm_lr,
                          warmup_steps=min(profile.arm_warmup, profile.arm_steps // 2)),
        checkpoint=CheckpointConfig(every=0, keep=1),
        metrics=MetricsConfig(progress=True, tensorboard=False),
        eval=EvalConfig(every=0, num_prompts=profile.eval_prompts * len(DOMAINS)),  # once, at the end
    )
    validate_config(config)
    return config


def per_domain(evaluation: dict[str, float], key: str) -> dict[str, float]:
    """``{domain: evaluation["<key>/<domain>"]}`` of a runner evaluation."""
    return {d.name: evaluation[f"{key}/{d.name}"] for d in DOMAINS}


def _result(arm: Arm, student: str, seed: int, evaluation: dict[str, float], scored: int, generated: int,
            corrected: int, grad: int, wall: float) -> ArmResult:
    return ArmResult(arm=arm.name, label=arm.label, student=student, seed=seed, off_policy=arm.off_policy,
                     greedy_accuracy=per_domain(evaluation, "greedy/accuracy"),
                     sampled_accuracy=per_domain(evaluation, "sampled/accuracy"),
                     reverse_kl=per_domain(evaluation, "reverse_kl"), teacher_scored_tokens=scored,
                     teacher_generated_tokens=generated, corrected_tokens=corrected, student_grad_tokens=grad,
                     wall_s=wall)


def _run_distill(arm: Arm, student: str, config: RunConfig) -> ArmResult:
    t0 = time.perf_counter()
    summary = train(config, overwrite=True)  # a re-run of the demo replaces its previous arm runs
    wall = time.perf_counter() - t0
    rows = read_metrics(config.run.out_dir)
    scored = generated = corrected = 0
    for row in rows:
        if row.get("kind") == "eval":
            continue
        scored += row["tokens"]
        generated += row["tokens"] if row["source"] == "teacher" else 0
        # a corrected token is a teacher sample too (drawn during the student's rollout)
        corrected += round(row.get("corrected_fraction", 0.0) * row["tokens"])
    return _result(arm, student, config.run.seed, summary["eval"], scored, generated + corrected, corrected, scored,
                   wall)


def _run_sft(arm: Arm, student: str, config: RunConfig, profile: Profile) -> ArmResult:
    t0 = time.perf_counter()
    lm = load_model(config.student.path, name="student", trainable=True)
    pool = read_examples(config.data.prompts)  # the runner arms' prompt pool, in an order of this seed's
    random.Random(config.run.seed).shuffle(pool)
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
    return _result(arm, student, config.run.seed, evaluation, 0, 0, 0, tokens, wall)


def run_arm(arm: Arm, profile: Profile, student: str, student_path: Path, teachers: dict[str, Path], data: DemoData,
            out: Path, seed: int) -> ArmResult:
    """Train one arm from the shared initial student (``student`` names which: "main" or "weak") and evaluate
    it on the held-out prompts of every domain."""
    config = run_config(arm, profile, student_path, teachers, data, out, seed)
    return _run_sft(arm, student, config, profile) if arm.sft else _run_distill(arm, student, config)
