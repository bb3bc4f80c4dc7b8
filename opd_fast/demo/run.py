"""``opd-fast demo``: prepare (or reuse) the teacher and the initial students, run every arm, report.

For each seed: the seed's initial student is prepared (cached), then every arm trains from it with the
same budget and is evaluated on the same held-out prompts. The initial student is evaluated too (the
``start`` row), so each arm's gain is visible.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..runner.evaluate import evaluate_run
from ..runner.models import torch_threads
from .arms import ARMS_BY_NAME, THREADS, Arm, run_arm, run_config
from .prepare import parameter_count, prepare_student, prepare_teacher
from .profiles import Profile
from .report import ArmResult, text_table, write_results

START = Arm("start", "initial student (before any arm)")


def _evaluate_start(profile: Profile, student: Path, teacher: Path, out: Path, seed: int) -> ArmResult:
    config = run_config(ARMS_BY_NAME["sft"], profile, student, teacher, out, seed)
    e = evaluate_run(config)
    return ArmResult(arm=START.name, label=START.label, seed=seed, greedy_accuracy=e["greedy/accuracy"],
                     sampled_accuracy=e["sampled/accuracy"], reverse_kl=e["reverse_kl"], teacher_scored_tokens=0,
                     teacher_generated_tokens=0, student_grad_tokens=0, wall_s=0.0)


def _trained(recipe: dict) -> str:
    attempts = len(recipe.get("attempts", [None]))
    redrawn = f" (initialization {attempts}; earlier ones missed the target)" if attempts > 1 else ""
    return f"{recipe['steps']} SFT steps{redrawn}, dev accuracy {recipe['dev_accuracy']}"


def run_demo(
    profile: Profile, seeds: Sequence[int], arms: Sequence[str], out: Path, cache: Path
) -> list[dict[str, Any]]:
    """Run the demo; returns the aggregated rows (also written under ``out``)."""
    unknown = [a for a in arms if a not in ARMS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; available: {sorted(ARMS_BY_NAME)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    with torch_threads(THREADS):
        return _run(profile, seeds, arms, Path(out), Path(cache))


def _run(profile: Profile, seeds: Sequence[int], arms: Sequence[str], out: Path, cache: Path) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    print(f"[demo] profile {profile.name}: task column_add ({profile.digits} digits), arms {', '.join(arms)}, "
          f"seeds {list(seeds)}; cache {cache}")
    teacher, t_recipe = prepare_teacher(profile, cache)
    print(f"[demo] teacher: {parameter_count(teacher):,} parameters, {_trained(t_recipe)}")
    results: list[ArmResult] = []
    students: dict[int, dict] = {}
    for seed in seeds:
        student, s_recipe = prepare_student(profile, cache, seed)
        students[seed] = s_recipe
        print(f"[demo] seed {seed}: initial student {parameter_count(student):,} parameters, {_trained(s_recipe)}")
        results.append(_evaluate_start(profile, student, teacher, out / f"seed{seed}" / "start", seed))
        for name in arms:
            print(f"[demo] seed {seed}: arm {name}")
            results.append(run_arm(ARMS_BY_NAME[name], profile, student, teacher, out / f"seed{seed}" / name, seed))
    meta = {"profile": profile.name, "settings": asdict(profile), "seeds": list(seeds), "arms": list(arms),
            "teacher": t_recipe, "students": students, "total_wall_s": time.perf_counter() - t0}
    rows = write_results(results, out, meta)
    print()
    print(text_table(rows))
    if profile.name == "quick":
        print("[demo] quick profile: a smoke test of the pipeline; its models are barely trained, so these numbers "
              "mean nothing. Run `opd-fast demo` for the real comparison.")
    print(f"\n[demo] {time.perf_counter() - t0:.0f} s; results in {out}/results.json, results.md, "
          "accuracy_vs_tokens.png")
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return rows
