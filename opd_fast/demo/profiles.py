"""Demo profiles: every size, step count and threshold of one demo run, in one place.

``quick`` is the same code path as ``default`` with fewer steps and prompts (CI smoke); nothing else
differs, so whatever the quick run exercises is what the full run does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from ..tasks.column_add import ColumnAdd


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
    # Teacher: trained once (cached) on demonstrations with retries until it is near perfect.
    teacher: ModelSize = ModelSize(64, 2, 4)
    teacher_retry_rate: float = 0.2
    teacher_lr: float = 3e-3
    teacher_batch: int = 64
    teacher_max_steps: int = 4000
    teacher_target: float = 0.97  # greedy and T=1 accuracy on a train-split dev set
    # Student: several times smaller; its shared start is SFT on ground truth up to an accuracy threshold.
    student: ModelSize = ModelSize(32, 2, 2)
    student_retry_rate: float = 0.05
    student_lr: float = 3e-3
    student_batch: int = 64
    student_max_steps: int = 3000
    student_target: float = 0.5  # greedy dev accuracy at which the shared start is frozen
    check_every: int = 100
    dev_prompts: int = 128
    # Arms: equal budget for every arm.
    arm_steps: int = 150
    arm_batch: int = 32
    arm_lr: float = 1e-3
    arm_warmup: int = 10
    train_prompts: int = 4096
    eval_prompts: int = 256
    eval_points: int = 3  # evaluations during an arm (for the accuracy-vs-tokens curve), the last at the end

    @property
    def digits(self) -> int:
        """The registered task's size: the runner builds the task by name, so the demo cannot change it."""
        return ColumnAdd().digits

    @property
    def max_new_tokens(self) -> int:
        """Room for the tagged answer, its EOS and three retries (two tokens each)."""
        return 2 * (self.digits + 1) + 7

    def teacher_key(self) -> str:
        """Cache key of everything that determines the teacher."""
        fields = {k: v for k, v in asdict(self).items() if k.startswith("teacher") or k == "check_every"}
        return _hash({**fields, "digits": self.digits})

    def student_key(self, seed: int) -> str:
        """Cache key of one seed's initial student (it depends on the teacher only through the task)."""
        fields = {k: v for k, v in asdict(self).items() if k.startswith("student") or k == "check_every"}
        return _hash({**fields, "digits": self.digits, "seed": seed})


DEFAULT = Profile(name="default")
# CI smoke: models far from trained, so its numbers mean nothing; it proves the pipeline end to end.
QUICK = replace(DEFAULT, name="quick", teacher_max_steps=60, student_max_steps=40, check_every=20, dev_prompts=32,
                arm_steps=6, arm_batch=8, eval_prompts=32, eval_points=2)
PROFILES = {p.name: p for p in (DEFAULT, QUICK)}
