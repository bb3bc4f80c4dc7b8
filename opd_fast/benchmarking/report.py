"""Tables (plain and Markdown), JSON and CSV from benchmark results, plus the run's metadata."""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from . import correctness, inputs
from .runner import BenchConfig, CaseResult
from .shapes import Shape

HEADERS = ("N", "V", "H", "dtype", "implementation", "fwd+bwd s (median, min-max)", "x floor",
           "first call s", "extra peak MB", "status")
_PACKAGES = ("opd-fast", "torch", "liger-kernel", "trl", "transformers", "triton")


def cpu_model() -> str:
    """The CPU's marketing name as /proc/cpuinfo (what lscpu prints) has it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Installed versions of opd-fast and of the packages a benchmark compares or depends on."""
    return {pkg: _version(pkg) for pkg in _PACKAGES}


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


IDLE_LOAD_PER_CORE = 0.5  # other work below half a core per core (load before the run started) counts as idle


def machine_load() -> dict[str, float | int | None]:
    """The 1-minute load average and the core count, to tell idle runs from runs on a busy machine."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not every platform has a load average
        load = None
    return {"loadavg_1m": load, "cores": os.cpu_count()}


def setting(meta: dict) -> str:
    """Machine, threads and load of a run, in words: results of different settings are never joined in a plot.

    The load before the run started is what other work was doing (once running, the benchmark itself
    loads every core). Runs recorded before this was measured may carry a ``load.label`` instead.
    """
    where = meta.get("gpu") or meta.get("cpu") or "unknown machine"
    load = meta.get("load") or {}
    before = (load.get("before") or {}) if isinstance(load, dict) else {}
    if "label" in load:
        state = load["label"]
    elif before.get("loadavg_1m") is not None and before.get("cores"):
        avg, cores = before["loadavg_1m"], before["cores"]
        state = "idle" if avg / cores < IDLE_LOAD_PER_CORE else f"busy (load {avg:.1f} on {cores} cores)"
    else:
        state = "load not recorded"
    return f"{where}, {meta.get('cpu_threads', '?')} threads, {state}"


def metadata(cfg: BenchConfig, argv: list[str] | None = None, load_before: dict | None = None) -> dict:
    """How the numbers were produced: command, date, machine, load, versions, input statistics."""
    device = torch.device(cfg.device)
    return {
        "command": shlex.join(["opd-fast", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": now_utc(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load": {"before": load_before or machine_load(), "after": machine_load()},
        "python": platform.python_version(),
        "versions": versions(),
        "config": asdict(cfg),
        "inputs": {
            "logit_std": inputs.LOGIT_STD,
            "teacher_operand_correlation": inputs.TEACHER_CORRELATION,
            "temperature": inputs.TEMPERATURE,
            "check_rows": correctness.CHECK_ROWS,
        },
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _secs(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _time_cell(res: CaseResult) -> str:
    t = res.timed
    if t is None:
        return "-"
    spread = "1 run" if len(t.runs) == 1 else f"{_secs(t.min)}-{_secs(t.max)}"
    return f"{_secs(t.median)} ({spread})"


def _status_cell(res: CaseResult) -> str:
    return res.status if not res.reason else f"{res.status}: {res.reason}"


def rows(results: list[CaseResult]) -> list[tuple[str, ...]]:
    """One table row per result, cells as strings, in ``HEADERS`` order."""
    out = []
    for r in results:
        hidden = str(r.shape.h_s) if r.shape.h_s == r.shape.h_t else f"{r.shape.h_s}/{r.shape.h_t}"
        out.append((
            str(r.shape.n), str(r.shape.v), hidden, r.dtype, r.impl, _time_cell(r), _fmt(r.ratio_to_floor, ".2f"),
            _fmt(r.first_call_s, ".2f"), _fmt(r.peak_extra_mb, ".0f"), _status_cell(r),
        ))
    return out


def format_table(results: list[CaseResult]) -> str:
    """Aligned plain-text table (numbers right-aligned)."""
    body = rows(results)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(HEADERS)] if body else []
    left = {"dtype", "implementation", "status"}

    def line(cells: tuple[str, ...]) -> str:
        padded = zip(cells, widths, HEADERS, strict=True)
        return "  ".join(c.ljust(w) if h in left else c.rjust(w) for c, w, h in padded)

    return "\n".join([line(HEADERS), line(tuple("-" * w for w in widths)), *(line(r) for r in body)]).rstrip()


def format_markdown(results: list[CaseResult]) -> str:
    """The same table as GitHub Markdown (for the README)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows(results)]
    return "\n".join(lines)


def result_dict(res: CaseResult) -> dict:
    """A flat, JSON-ready record of one result (timing summary included)."""
    t = res.timed
    record = {**res.shape.as_dict(), **{k: v for k, v in asdict(res).items() if k != "shape"}}
    record.update(median_s=t and t.median, min_s=t and t.min, max_s=t and t.max, repeats=len(res.runs_s))
    return record


def write_json(path: str | Path, results: list[CaseResult], meta: dict) -> None:
    Path(path).write_text(json.dumps({**meta, "results": [result_dict(r) for r in results]}, indent=2) + "\n")


def write_csv(path: str | Path, results: list[CaseResult]) -> None:
    records = [result_dict(r) for r in results]
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k in (records[0] if records else {}) if k != "runs_s"])
        writer.writeheader()
        for rec in records:
            writer.writerow({k: v for k, v in rec.items() if k != "runs_s"})


def load_json(path: str | Path) -> tuple[dict, list[CaseResult]]:
    """Metadata and results of a ``write_json`` file (to merge runs into one table or plot)."""
    data = json.loads(Path(path).read_text())
    names = {f.name for f in fields(CaseResult)} - {"shape"}
    results = [
        CaseResult(shape=Shape(rec["n"], rec["v"], rec["h_s"], rec["h_t"]), **{k: rec[k] for k in names if k in rec})
        for rec in data.pop("results")
    ]
    return data, results
