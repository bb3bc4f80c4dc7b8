"""The demo's results: one ``ArmResult`` per (student, arm, seed); per domain a table of means with standard
errors, the paired difference of each on-policy arm against the best off-policy arm, JSON, Markdown and
one bar chart per domain.

Accuracy is the domain verifier's score on held-out prompts, greedy and at T=1; ``reverse_kl`` is the mean
per-token KL(student || teacher) on the student's own T=1 samples. The token columns make budgets
comparable: tokens the teacher scored (a forward pass of the teacher per token), tokens the teacher
generated (off-policy teacher samples and corrected tokens, the costliest), tokens the student took a
gradient on.

Standard errors. Within a seed every arm starts from the same student and is evaluated on the same
prompts, so arms are compared by their **paired difference per seed**; the standard error of a mean over
``S`` seeds is ``std / sqrt(S)`` (sample std, ``S - 1`` degrees of freedom) of the per-seed values, which
folds in both the spread of the starts and the evaluation's sampling noise. A single seed has only the
evaluation's noise: the binomial standard error of an accuracy on ``n`` prompts, and for a difference that
of two independent accuracies (an upper bound on the paired one). The bar for on-policy distillation is
set over at least ``MIN_SEEDS`` seeds, so a single seed never clears it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

METRICS = ("greedy_accuracy", "sampled_accuracy", "reverse_kl")
COUNTS = ("teacher_scored_tokens", "teacher_generated_tokens", "corrected_tokens", "student_grad_tokens", "wall_s")
MIN_SEEDS = 3  # the bar on-policy must clear is set over at least this many seeds
START = "start"  # the arm name of the initial student's evaluation
SPECIALIST = "specialist"  # ... and of each domain's teacher evaluated on its own domain


@dataclass
class ArmResult:
    """One arm trained from one seed's initial student (``student``: "main" or "weak"); metrics per domain."""

    arm: str
    label: str
    student: str
    seed: int
    off_policy: bool
    greedy_accuracy: dict[str, float]
    sampled_accuracy: dict[str, float]
    reverse_kl: dict[str, float]
    teacher_scored_tokens: int = 0
    teacher_generated_tokens: int = 0
    corrected_tokens: int = 0
    student_grad_tokens: int = 0
    wall_s: float = 0.0


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error ``std / sqrt(n)`` (None for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_se needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float | None]:
    """Mean and standard error over the seeds both have of the per-seed difference ``a - b``."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two arms share no seed to pair")
    return mean_se([a[s] - b[s] for s in seeds])


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent prompts (one sample each)."""
    return math.sqrt(p * (1 - p) / n)


def _seed_or_binomial(mean_and_se: tuple[float, float | None], binomial: float) -> tuple[float, float | None]:
    """The seeds' standard error when there are several seeds, else the evaluation's binomial one."""
    mean, se = mean_and_se
    return mean, se if se is not None else binomial


def _groups(results: Sequence[ArmResult]) -> dict[tuple[str, str], list[ArmResult]]:
    groups: dict[tuple[str, str], list[ArmResult]] = {}
    for r in results:
        groups.setdefault((r.student, r.arm), []).append(r)
    return groups


def domain_rows(results: Sequence[ArmResult], domain: str, student: str, prompts: int = 0) -> list[dict[str, Any]]:
    """One row per arm of ``student`` (and the specialist) on ``domain``, in first-seen order: every metric's
    mean and SE over seeds; on-policy rows add ``diff_vs_best_off_policy`` (T=1 accuracy, paired, with SE),
    the best off-policy arm by mean T=1 accuracy, and ``beats_every_off_policy`` (over at least
    ``MIN_SEEDS`` seeds, by more than 2 SE of the difference against each off-policy arm).

    With a single seed and ``prompts`` (eval prompts per domain) given, accuracies carry the evaluation's
    binomial SE instead, and differences that of two independent accuracies (conservative: both arms are
    graded on the same prompts, whose paired difference would vary less)."""
    groups = {arm: runs for (who, arm), runs in _groups(results).items() if who in (student, SPECIALIST)}
    rows: list[dict[str, Any]] = []
    for arm, runs in groups.items():
        runs = [r for r in runs if domain in r.sampled_accuracy]
        if not runs:
            continue
        row: dict[str, Any] = {"arm": arm, "label": runs[0].label, "off_policy": runs[0].off_policy,
                               "seeds": [r.seed for r in runs]}
        for key in METRICS:
            row[key], row[f"{key}_se"] = mean_se([getattr(r, key)[domain] for r in runs])
            if key != "reverse_kl" and prompts:
                row[f"{key}_se"] = _seed_or_binomial((row[key], row[f"{key}_se"]), binomial_se(row[key], prompts))[1]
        for key in COUNTS:
            row[key] = mean_se([float(getattr(r, key)) for r in runs])[0]
        rows.append(row)
    t1 = {arm: {r.seed: r.sampled_accuracy[domain] for r in runs if domain in r.sampled_accuracy}
          for arm, runs in groups.items()}
    by_arm = {row["arm"]: row for row in rows}

    def difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float | None]:
        mean, se = paired_difference(t1[a["arm"]], t1[b["arm"]])
        if se is None and prompts:
            se = math.sqrt(binomial_se(a["sampled_accuracy"], prompts) ** 2
                           + binomial_se(b["sampled_accuracy"], prompts) ** 2)
        return mean, se

    baselines = [row["arm"] for row in rows if row["off_policy"]]
    if baselines:
        best = max(baselines, key=lambda arm: next(r["sampled_accuracy"] for r in rows if r["arm"] == arm))
        for row in rows:
            if row["off_policy"] or row["arm"] in (START, SPECIALIST):
                continue
            diffs = {arm: difference(row, by_arm[arm]) for arm in baselines}
            row["best_off_policy"] = best
            row["diff_vs_best_off_policy"], row["diff_vs_best_off_policy_se"] = diffs[best]
            row["beats_every_off_policy"] = len(row["seeds"]) >= MIN_SEEDS and all(
                se is not None and d > 2 * se for d, se in diffs.values())
    return rows


def _pm(mean: float, se: float | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _count(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


HEADER = ("arm", "acc greedy", "acc T=1", "Δ T=1 vs best off-policy", "rev KL", "teacher-scored", "teacher-gen",
          "student-grad", "wall s")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        diff = ""
        if "diff_vs_best_off_policy" in row:
            diff = _pm(row["diff_vs_best_off_policy"], row["diff_vs_best_off_policy_se"])
            diff += f" ({row['best_off_policy']})" + (" ✓" if row["beats_every_off_policy"] else "")
        out.append([row["label"], _pm(row["greedy_accuracy"], row["greedy_accuracy_se"]),
                    _pm(row["sampled_accuracy"], row["sampled_accuracy_se"]), diff,
                    _pm(row["reverse_kl"], row["reverse_kl_se"]), _count(row["teacher_scored_tokens"]),
                    _count(row["teacher_generated_tokens"]), _count(row["student_grad_tokens"]),
                    f"{row['wall_s']:.0f}"])
    return out


def text_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width table for the terminal."""
    body = [list(HEADER), *table_rows(rows)]
    widths = [max(len(r[i]) for r in body) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    return "\n".join(lines)


def summarize(results: Sequence[ArmResult], prompts: int = 0) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{student: {domain: rows}}`` for every student and domain in ``results`` (``prompts``: eval prompts
    per domain, for single-seed standard errors)."""
    students = [s for s in dict.fromkeys(r.student for r in results) if s != SPECIALIST]
    domains = list(dict.fromkeys(d for r in results for d in r.sampled_accuracy))
    return {s: {d: domain_rows(results, d, s, prompts) for d in domains} for s in students}


STUDENT_TITLES = {"main": "the student", "weak": "the weak student (rescue)"}


def verdict_lines(summary: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """Per student and domain, the on-policy arm closest to the bar, its paired lead over the best off-policy
    arm in standard errors, and whether it clears the bar: the demo's question answered in one line each."""
    lines = []
    for student, domains in summary.items():
        for domain, rows in domains.items():
            scored = [r for r in rows if "diff_vs_best_off_policy" in r]
            if not scored:
                continue
            best = max(scored, key=lambda r: r["diff_vs_best_off_policy"])
            d, se = best["diff_vs_best_off_policy"], best["diff_vs_best_off_policy_se"]
            ratio = f" ({d / se:+.1f} SE)" if se else ""
            seeds = len(best["seeds"])
            if best["beats_every_off_policy"]:
                status = "clears the bar"
            else:
                status = "does not clear the bar" + (f" (it needs >= {MIN_SEEDS} seeds)" if seeds < MIN_SEEDS else "")
            lines.append(f"{domain}, {STUDENT_TITLES.get(student, student)}: best on-policy arm {best['label']} "
                         f"{d:+.3f} ± {se or 0.0:.3f}{ratio} T=1 accuracy against {best['best_off_policy']}, "
                         f"{seeds} seed(s): {status}")
    return lines


def report_text(summary: dict[str, dict[str, list[dict[str, Any]]]], markdown: bool) -> str:
    table = markdown_table if markdown else text_table
    parts = []
    for student, domains in summary.items():
        for domain, rows in domains.items():
            title = f"{domain}, {STUDENT_TITLES.get(student, student)}"
            parts.append(f"### {title}\n\n{table(rows)}" if markdown else f"[{title}]\n{table(rows)}")
    verdict = verdict_lines(summary)
    if verdict:
        head = (f"The bar: an on-policy arm ahead of every off-policy arm by more than 2 standard errors of the "
                f"paired difference at T=1, over at least {MIN_SEEDS} seeds.")
        items = "\n".join(f"- {line}" for line in verdict)
        parts.append(f"### Verdict\n\n{head}\n\n{items}" if markdown else f"[verdict] {head}\n{items}")
    return "\n\n".join(parts)


SE_NOTE = ("mean ± standard error over seeds (a single seed: the evaluation's binomial standard error, and "
           "differences as of two independent accuracies); Δ is the per-seed paired difference in T=1 accuracy "
           "against the best off-policy arm (by mean), mean ± its standard error; ✓ = over at least 3 seeds, "
           "ahead of every off-policy arm by more than 2 standard errors of the difference")


def write_results(results: Sequence[ArmResult], out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``results.json`` (meta, per-run results, per-domain summary), ``results.md`` and one
    ``accuracy_<domain>.png`` per domain (a panel per student); returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, meta.get("settings", {}).get("eval_prompts", 0))
    payload = {"meta": meta, "runs": [asdict(r) for r in results], "summary": summary}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    seeds = sorted({r.seed for r in results if r.student != SPECIALIST})
    wall = meta.get("total_wall_s")
    note = f"seeds {seeds}; {SE_NOTE}; {meta.get('profile', '')} profile" + (
        f"; {wall:.0f} s wall time" if wall is not None else "")
    (out / "results.md").write_text(f"{report_text(summary, markdown=True)}\n\n({note})\n")
    for domain in dict.fromkeys(d for domains in summary.values() for d in domains):
        plot_domain({student: domains[domain] for student, domains in summary.items() if domain in domains}, domain,
                    out / f"accuracy_{domain}.png")
    return summary


def load_results(path: Path) -> tuple[list[ArmResult], dict[str, Any]]:
    """The runs and meta of a ``results.json``."""
    payload = json.loads(Path(path).read_text())
    runs = [ArmResult(**r) for r in payload["runs"]]
    return runs, payload["meta"]


def merge_results(dirs: Sequence[Path], out: Path, total_wall_s: float | None = None) -> dict[str, Any]:
    """Combine the runs of several demo outputs (e.g. one process per seed) into one report under ``out``;
    the specialists' rows, the same in every output, are kept once. ``total_wall_s`` is the wall time of
    the whole (when the outputs ran in parallel); by default the sum of theirs."""
    loaded = [load_results(Path(d) / "results.json") for d in dirs]
    profiles = {meta["profile"] for _, meta in loaded}
    if len(profiles) != 1:
        raise ValueError(f"cannot merge results of different profiles: {sorted(profiles)} from {list(dirs)}")
    specialists = [r for r in loaded[0][0] if r.student == SPECIALIST]
    runs = [r for rs, _ in loaded for r in rs if r.student != SPECIALIST]
    seen = [(r.student, r.arm, r.seed) for r in runs]
    if len(set(seen)) != len(seen):
        repeated = sorted({x for x in seen if seen.count(x) > 1})
        raise ValueError(f"the merged outputs repeat (student, arm, seed) runs: {repeated}")
    runs.sort(key=lambda r: r.seed)  # stable: arms keep their order within a seed
    recipes = {key: {seed: recipe for _, m in loaded for seed, recipe in m.get(key, {}).items()}
               for key in ("students", "weak_students")}
    arms = {key: list(dict.fromkeys(a for _, m in loaded for a in m.get(key, []))) for key in ("arms", "weak_arms")}
    meta = {**loaded[0][1], **recipes, **arms, "merged_from": [str(d) for d in dirs],
            "seeds": sorted({r.seed for r in runs}),
            "total_wall_s": total_wall_s if total_wall_s is not None
            else sum(m.get("total_wall_s", 0.0) for _, m in loaded)}
    return write_results(specialists + runs, out, meta)


def plot_domain(students: dict[str, Sequence[dict[str, Any]]], domain: str, path: Path) -> None:
    """Held-out accuracy on ``domain`` per arm, greedy and T=1 side by side, with standard-error bars (the
    specialist and the start included, for scale): one panel per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [max(6.0, 1.1 * len(rows) + 2) for rows in students.values()]
    fig, axes = plt.subplots(1, len(students), figsize=(sum(widths), 4.8), width_ratios=widths, squeeze=False)
    width = 0.38
    for ax, (student, rows) in zip(axes[0], students.items(), strict=True):
        for offset, key, label in ((-width / 2, "greedy_accuracy", "greedy"), (width / 2, "sampled_accuracy", "T=1")):
            xs = [i + offset for i in range(len(rows))]
            errs = [row[f"{key}_se"] or 0.0 for row in rows]
            ax.bar(xs, [row[key] for row in rows], width, yerr=errs, capsize=3, label=label)
        ax.set_xticks(range(len(rows)), [row["label"] for row in rows], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
        seeds = sorted({s for row in rows for s in row["seeds"] if row["arm"] != SPECIALIST})
        ax.set_title(f"{domain}, {STUDENT_TITLES.get(student, student)} (mean ± SE over seeds {seeds})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
