"""The demo's results: one row per (arm, seed), aggregated to mean ± std, as a table, JSON, Markdown and a PNG.

Accuracy is the task verifier's exact match on held-out prompts, greedy and at T=1; ``reverse_kl`` is the
mean per-token KL(student || teacher) on the student's own T=1 samples. The token columns make budgets
comparable: tokens the teacher scored (a forward pass of the teacher per token), tokens the teacher
generated (off-policy teacher samples, the costliest), and tokens the student took a gradient on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METRICS = ("greedy_accuracy", "sampled_accuracy", "reverse_kl")
COUNTS = ("teacher_scored_tokens", "teacher_generated_tokens", "student_grad_tokens", "wall_s")


@dataclass
class ArmResult:
    """One arm trained from one seed's initial student."""

    arm: str
    label: str
    seed: int
    greedy_accuracy: float
    sampled_accuracy: float
    reverse_kl: float
    teacher_scored_tokens: int
    teacher_generated_tokens: int
    student_grad_tokens: int
    wall_s: float
    # (teacher-scored tokens so far, T=1 accuracy) at each evaluation, for the plot.
    curve: list[tuple[int, float]] = field(default_factory=list)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def aggregate(results: Sequence[ArmResult]) -> list[dict[str, Any]]:
    """Per arm, in first-seen order: mean and std of every metric and count over seeds."""
    arms: dict[str, list[ArmResult]] = {}
    for r in results:
        arms.setdefault(r.arm, []).append(r)
    rows = []
    for arm, runs in arms.items():
        row: dict[str, Any] = {"arm": arm, "label": runs[0].label, "seeds": [r.seed for r in runs]}
        for key in METRICS + COUNTS:
            row[key], row[f"{key}_std"] = _mean_std([float(getattr(r, key)) for r in runs])
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    mean, std = row[key], row[f"{key}_std"]
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if len(row["seeds"]) > 1 else "")


def _count(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


HEADER = ("arm", "acc greedy", "acc T=1", "rev KL", "teacher-scored", "teacher-gen", "student-grad", "wall s")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [row["label"], _cell(row, "greedy_accuracy", 3), _cell(row, "sampled_accuracy", 3), _cell(row, "reverse_kl", 3),
         _count(row["teacher_scored_tokens"]), _count(row["teacher_generated_tokens"]),
         _count(row["student_grad_tokens"]), f"{row['wall_s']:.0f}"]
        for row in rows
    ]


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


def write_results(results: Sequence[ArmResult], out: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Write ``results.json`` (meta, per-run and aggregated rows), ``results.md`` and ``accuracy_vs_tokens.png``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results)
    payload = {"meta": meta, "runs": [asdict(r) for r in results], "summary": rows}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    seeds = sorted({r.seed for r in results})
    note = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    (out / "results.md").write_text(f"{markdown_table(rows)}\n\n({note}; {meta.get('profile', '')} profile)\n")
    plot_curves(results, out / "accuracy_vs_tokens.png")
    return rows


def merge_results(dirs: Sequence[Path], out: Path) -> list[dict[str, Any]]:
    """Combine the runs of several demo outputs (e.g. one process per seed) into one report under ``out``."""
    payloads = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    profiles = {p["meta"]["profile"] for p in payloads}
    if len(profiles) != 1:
        raise ValueError(f"cannot merge results of different profiles: {sorted(profiles)} from {list(dirs)}")
    runs = [ArmResult(**{**r, "curve": [tuple(c) for c in r["curve"]]}) for p in payloads for r in p["runs"]]
    seen = [(r.arm, r.seed) for r in runs]
    if len(set(seen)) != len(seen):
        repeated = sorted({x for x in seen if seen.count(x) > 1})
        raise ValueError(f"the merged outputs repeat (arm, seed) pairs: {repeated}")
    runs.sort(key=lambda r: r.seed)  # stable: arms keep their order within a seed
    meta = {**payloads[0]["meta"], "merged_from": [str(d) for d in dirs], "seeds": sorted({r.seed for r in runs})}
    return write_results(runs, out, meta)


def plot_curves(results: Sequence[ArmResult], path: Path) -> None:
    """T=1 accuracy against teacher-scored tokens, one line per arm (mean over seeds at each evaluation).
    Arms that never query the teacher (SFT) are drawn as a horizontal line at their final accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms: dict[str, list[ArmResult]] = {}
    for r in results:
        arms.setdefault(r.arm, []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    flat_styles = iter([("black", ":"), ("grey", "--"), ("grey", "-."), ("grey", ":")])
    for runs in arms.values():
        label = runs[0].label
        if all(r.teacher_scored_tokens == 0 for r in runs):
            color, style = next(flat_styles, ("grey", "--"))
            ax.axhline(_mean_std([r.sampled_accuracy for r in runs])[0], ls=style, color=color, label=label)
            continue
        length = min(len(r.curve) for r in runs)
        xs = [_mean_std([r.curve[i][0] for r in runs])[0] for i in range(length)]
        ys = [_mean_std([r.curve[i][1] for r in runs])[0] for i in range(length)]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("teacher-scored tokens")
    ax.set_ylabel("held-out accuracy at T=1")
    ax.set_title("column_add: accuracy vs teacher compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
