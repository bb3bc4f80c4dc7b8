"""How the demo's students use column_add's retry token: a check on *why* an arm wins, not only whether it does.

For each arm's final (main) student of a seed, sample one T=1 answer per held-out column_add prompt and report
accuracy, the share of answers that use ``<``, and how many of those end correct (a successful recovery).

    python examples/demo/retry_usage.py runs/demo-default 0 [1 2 ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from opd_fast.demo.arms import DEFAULT_ARMS
from opd_fast.demo.profiles import DEFAULT
from opd_fast.runner.config import RolloutConfig
from opd_fast.runner.data import Prompt
from opd_fast.runner.models import load_model, torch_threads
from opd_fast.runner.rollout import rollout
from opd_fast.tasks.column_add import RETRY, ColumnAdd


def student_dirs(out: Path, cache: Path, seed: int) -> dict[str, Path]:
    dirs = {"start": cache / f"student-seed{seed}"}
    for arm in DEFAULT_ARMS:
        run = out / f"seed{seed}" / "main" / arm
        dirs[arm] = run / "student" if arm == "sft" else sorted((run / "checkpoints").glob("step-*"))[-1] / "student"
    return dirs


def main(out: Path, seeds: list[int], cache: Path = Path("runs/demo-cache"), prompts: int = 256) -> None:
    task = ColumnAdd()
    examples = task.examples("eval", prompts, 0)
    items = [Prompt(i, e.prompt, e.domain, e.reference) for i, e in enumerate(examples)]
    cfg = RolloutConfig(max_new_tokens=DEFAULT.max_new_tokens, temperature=1.0, micro_batch_size=64)
    for seed in seeds:
        for arm, path in student_dirs(out, cache, seed).items():
            lm = load_model(str(path))
            gen = torch.Generator().manual_seed(123)
            texts = [t for i in range(0, len(items), 64) for t in rollout(lm, items[i : i + 64], cfg, gen).completions]
            correct = [task.verify(e.prompt, t, e.reference) == 1.0 for e, t in zip(examples, texts, strict=True)]
            retried = [RETRY in t for t in texts]
            recovered = sum(c and r for c, r in zip(correct, retried, strict=True))
            print(f"seed {seed}  {arm:14s} T=1 acc {sum(correct) / len(texts):.3f}  answers with '<' "
                  f"{sum(retried) / len(texts):.3f}  of which correct {recovered}/{sum(retried)}")


if __name__ == "__main__":
    with torch_threads(1):
        main(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]])
