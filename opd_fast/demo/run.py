"""``opd-fast demo``: prepare (or reuse) the specialists and the initial students, run every arm, report.

Two specialist teachers (one per domain) are prepared first and evaluated on their own domain (the
``specialist`` rows). For each seed: the seed's initial student is prepared, evaluated (the ``start``
row, so each arm's gain is visible), then every arm trains from it over both domains with the same
budget and is evaluated on the same held-out prompts of each domain. The weak student's start and its
arms (plain and teacher-corrected on-policy reverse KL) follow, for the rescue comparison.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..runner.data import read_examples
from ..runner.evaluate import evaluate_run
from ..runner.models import load_model, torch_threads
from .arms import ARMS_BY_NAME, THREADS, DemoData, per_domain, run_arm, run_config
from .domains import DOMAINS, mixed_examples, write_prompts
from .prepare import accuracy, parameter_count, prepare_student, prepare_teacher
from .profiles import Profile
from .report import SPECIALIST, START, ArmResult, merge_results, report_text, write_results

START_LABEL = "initial student (before any arm)"


def _evaluate_start(profile: Profile, student: str, path: Path, teachers: dict[str, Path], data: DemoData,
                    out: Path, seed: int) -> ArmResult:
    config = run_config(ARMS_BY_NAME["sft"], profile, path, teachers, data, out, seed)
    e = evaluate_run(config)
    return ArmResult(arm=START, label=START_LABEL, student=student, seed=seed, off_policy=False,
                     greedy_accuracy=per_domain(e, "greedy/accuracy"),
                     sampled_accuracy=per_domain(e, "sampled/accuracy"), reverse_kl=per_domain(e, "reverse_kl"))


def _evaluate_specialist(profile: Profile, domain: str, path: Path, data: DemoData) -> ArmResult:
    """The teacher on its own domain's held-out prompts (its reverse KL to itself is 0)."""
    lm = load_model(str(path))
    examples = [ex for ex in read_examples(data.eval) if ex.domain == domain]
    acc = {mode: accuracy(lm, examples, temperature, 0, profile.max_new_tokens)[domain]
           for mode, temperature in (("greedy", 0.0), ("sampled", 1.0))}
    return ArmResult(arm=SPECIALIST, label=f"specialist teacher ({domain})", student=SPECIALIST, seed=0,
                     off_policy=False, greedy_accuracy={domain: acc["greedy"]},
                     sampled_accuracy={domain: acc["sampled"]}, reverse_kl={domain: 0.0})


def _trained(recipe: dict) -> str:
    attempts = len(recipe.get("attempts", [None]))
    redrawn = f" (initialization {attempts}; earlier ones missed the target)" if attempts > 1 else ""
    return f"{recipe['steps']} SFT steps{redrawn}, dev accuracy {recipe['dev_accuracy']}"


def run_demo(
    profile: Profile,
    seeds: Sequence[int],
    arms: Sequence[str],
    out: Path,
    cache: Path,
    *,
    weak_arms: Sequence[str] = (),
    retrain: bool = False,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run the demo; returns the per-student, per-domain summary (also written under ``out``).

    ``retrain`` trains every model from scratch instead of reusing shipped or cached ones. ``jobs > 1``
    runs the (seed, student) pairs in that many worker processes (each single-threaded, as the models are
    tiny), each into ``out/seed<K>-<student>``, and merges their results into ``out``.
    """
    unknown = [a for a in [*arms, *weak_arms] if a not in ARMS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; available: {sorted(ARMS_BY_NAME)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out, cache = Path(out), Path(cache)
    units = [(seed, student, names) for seed in seeds for student, names in (("main", arms), ("weak", weak_arms))
             if names]
    if jobs == 1 or len(units) == 1:
        with torch_threads(THREADS):
            return _run(profile, seeds, arms, weak_arms, out, cache, retrain)
    t0 = time.perf_counter()
    workers = min(jobs, len(units))
    print(f"[demo] profile {profile.name}: seeds {list(seeds)}, main and weak student as {len(units)} runs in "
          f"{workers} worker processes, each into {out}/seed<K>-<student>; preparing the shared models first "
          f"(cache {cache})")
    with torch_threads(THREADS):  # once, here: the workers then find them in the cache
        _run(profile, [], (), (), out / "specialists", cache, retrain)
        if profile.shared_start:
            for student in dict.fromkeys(student for _, student, _ in units):  # only students that have arms
                prepare_student(profile, cache, profile.start_seed(0), weak=student == "weak", retrain=retrain)
    dirs = [out / f"seed{seed}-{student}" for seed, student, _ in units]
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        # the parent prepared the teachers (and shared starts): a worker retrains only a start of its own
        futures = [pool.submit(_run_unit, profile, seed, student, names, where, cache, retrain and not
                               profile.shared_start) for (seed, student, names), where in zip(units, dirs, strict=True)]
        for future in futures:
            future.result()
    summary = merge_results([out / "specialists", *dirs], out, total_wall_s=time.perf_counter() - t0)
    print(f"\n[demo] merged seeds {list(seeds)} into {out}\n")
    print(report_text(summary, markdown=False))
    return summary


def _run_unit(profile: Profile, seed: int, student: str, names: Sequence[str], out: Path, cache: Path,
              retrain_start: bool) -> None:
    """One worker's share: one seed's arms of one student, without the specialists' rows (the parent has
    them)."""
    with torch_threads(THREADS):
        main, weak = (names, ()) if student == "main" else ((), names)
        _run(profile, [seed], main, weak, out, cache, False, retrain_students=retrain_start, specialists=False)


def _run(profile: Profile, seeds: Sequence[int], arms: Sequence[str], weak_arms: Sequence[str], out: Path,
         cache: Path, retrain: bool, *, retrain_students: bool | None = None,
         specialists: bool = True) -> dict[str, Any]:
    """The demo in this process. ``retrain`` retrains every model, ``retrain_students`` (default: as
    ``retrain``) the starts only; ``specialists`` evaluates the teachers on their own domain."""
    retrain_students = retrain if retrain_students is None else retrain_students
    t0 = time.perf_counter()
    print(f"[demo] profile {profile.name}: domains {', '.join(d.name for d in DOMAINS)}, arms {', '.join(arms)}, "
          f"weak-student arms {', '.join(weak_arms) or 'none'}, seeds {list(seeds)}; cache {cache}")
    data = DemoData(write_prompts(out / "data" / "train.jsonl", mixed_examples("train", profile.train_prompts, 0)),
                    write_prompts(out / "data" / "eval.jsonl", mixed_examples("eval", profile.eval_prompts, 0)))
    teachers: dict[str, Path] = {}
    recipes: dict[str, Any] = {"teachers": {}, "students": {}, "weak_students": {}}
    results: list[ArmResult] = []
    for domain in DOMAINS:
        teachers[domain.name], recipe = prepare_teacher(profile, cache, domain, retrain=retrain)
        recipes["teachers"][domain.name] = recipe
        print(f"[demo] {domain.name} teacher: {parameter_count(teachers[domain.name]):,} parameters, "
              f"{_trained(recipe)}")
        if specialists:
            results.append(_evaluate_specialist(profile, domain.name, teachers[domain.name], data))
    groups = [(student, names, weak) for student, names, weak in (("main", arms, False), ("weak", weak_arms, True))
              if names]  # a student without arms is not prepared at all
    for seed in seeds:
        for student, names, weak in groups:
            start = profile.start_seed(seed)
            path, recipe = prepare_student(profile, cache, start, weak=weak, retrain=retrain_students)
            recipes["weak_students" if weak else "students"][seed] = {**recipe, "start_seed": start}
            shared = f" (seed {start}'s start)" if start != seed else ""
            print(f"[demo] seed {seed}: {student} initial student{shared} {parameter_count(path):,} parameters, "
                  f"{_trained(recipe)}")
            where = out / f"seed{seed}" / student
            results.append(_evaluate_start(profile, student, path, teachers, data, where / START, seed))
            for name in names:
                print(f"[demo] seed {seed}: {student} student, arm {name}")
                results.append(run_arm(ARMS_BY_NAME[name], profile, student, path, teachers, data, where / name, seed))
    meta = {"profile": profile.name, "settings": asdict(profile), "seeds": list(seeds), "arms": list(arms),
            "weak_arms": list(weak_arms), **recipes, "total_wall_s": time.perf_counter() - t0}
    summary = write_results(results, out, meta)
    if not seeds:
        return summary
    print()
    print(report_text(summary, markdown=False))
    if profile.name == "quick":
        print("[demo] quick profile: a smoke test of the pipeline; its models are barely trained, so these numbers "
              "mean nothing. Run `opd-fast demo` for the real comparison.")
    print(f"\n[demo] {time.perf_counter() - t0:.0f} s; results in {out}/results.json, results.md, "
          "accuracy_<domain>.png")
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return summary
