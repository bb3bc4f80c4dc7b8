"""Demo profiles: every size, step count and threshold of one demo run, in one place.

``quick`` is the same code path as ``default`` with fewer steps and prompts (CI smoke); nothing else
differs, so whatever the quick run exercises is what the full run does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from ..runner.config import CorrectionConfig
from .domains import DOMAINS


def _hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_layers: int
    num_heads: int


@dataclass(frozen=True)
class Profile:
    name: str
    # Teachers (one per domain, the same recipe): trained once until near perfect on their own task.
    teacher: ModelSize = ModelSize(64, 2, 4)
    teacher_retry_rate: float = 0.2  # column_add's demonstrations with a taken-back slip (its only retry task)
    teacher_lr: float = 3e-3
    teacher_batch: int = 64
    teacher_max_steps: int = 4000
    teacher_target: float = 0.97  # greedy and T=1 accuracy on a train-split dev set
    # Student: several times smaller; its shared start is SFT on both domains' references up to an accuracy
    # threshold on each. The weak student is smaller still, for the corrected-rollout rescue.
    student: ModelSize = ModelSize(32, 2, 2)
    student_retry_rate: float = 0.05
    student_lr: float = 3e-3
    student_batch: int = 64
    student_max_steps: int = 3000
    student_target: float = 0.4  # greedy dev accuracy (every domain) at which the shared start is frozen
    weak_student: ModelSize = ModelSize(16, 2, 2)
    weak_student_target: float = 0.1
    check_every: int = 100
    dev_prompts: int = 128  # per domain
    # Seeds run unless the command line says otherwise. With ``shared_start`` every seed's arms train from
    # seed 0's starts (the shipped ones) and the seeds vary everything after the start: prompt order, the
    # student's and teachers' samples, the T=1 evaluation draws. Training a start per seed is a
    # seed-dependent phase change that took 900 to over 6000 SFT steps (far beyond the demo's 10 minutes),
    # so per-seed starts (``--own-starts``) are there for whoever has the CPU hours.
    seeds: int = 3
    shared_start: bool = True
    # Arms: equal budget for every arm.
    arm_steps: int = 150
    arm_batch: int = 32
    arm_lr: float = 1e-3
    arm_warmup: int = 10
    train_prompts: int = 4096  # per domain; batches mix the domains equally
    eval_prompts: int = 256  # per domain
    # Corrected rollouts (the rescue arm): a student token the teacher gives less than this probability
    # is replaced by a teacher sample, always at first, then less and less until the arm's last step.
    correction_min_prob: float = 0.1

    @property
    def correction(self) -> CorrectionConfig:
        return CorrectionConfig(min_prob=self.correction_min_prob, rate=1.0, decay_steps=self.arm_steps)

    def start_seed(self, seed: int) -> int:
        """The seed whose initial student the arms of ``seed`` train from."""
        return 0 if self.shared_start else seed

    @property
    def max_new_tokens(self) -> int:
        """Room for the longest tagged answer, its EOS and, where the task has a retry token, three retries
        (two tokens each)."""
        return max(d.answer_tokens + (6 if d.retries else 0) for d in DOMAINS)

    def teacher_key(self, domain: str) -> str:
        """Cache key of everything that determines the teacher of ``domain``."""
        fields = {k: v for k, v in asdict(self).items()
                  if k.startswith("teacher") or k in ("check_every", "dev_prompts")}
        return _hash({**fields, "domain": domain, "tasks": _tasks()})

    def student_key(self, seed: int, weak: bool = False) -> str:
        """Cache key of one seed's initial student (it depends on the teachers only through the tasks)."""
        prefix = "weak_student" if weak else "student"
        fields = {k: v for k, v in asdict(self).items()
                  if (k.startswith(prefix) or k in ("check_every", "dev_prompts", "student_lr", "student_batch",
                                                     "student_max_steps", "student_retry_rate"))}
        return _hash({**fields, "seed": seed, "tasks": _tasks()})


def _tasks() -> list[dict]:
    """The domains' task settings (part of every model's cache key)."""
    return [{"domain": d.name, **asdict(d.task)} for d in DOMAINS]


DEFAULT = Profile(name="default")
# CI smoke: models far from trained, so its numbers mean nothing; it proves the pipeline end to end.
QUICK = replace(DEFAULT, name="quick", seeds=1, teacher_max_steps=60, student_max_steps=40, check_every=20,
                dev_prompts=32, arm_steps=6, arm_batch=8, eval_prompts=32)
PROFILES = {p.name: p for p in (DEFAULT, QUICK)}
