"""The run directory's contract: what a new run, ``--resume`` and ``--overwrite`` may do to it.

- A new run refuses a directory that already holds a run (metrics, config, checkpoints) unless
  ``overwrite`` is given, which deletes exactly the files a run writes (never other files), and only
  once the new run's start-up checks passed.
  Silently reusing it would mix two runs' metrics and let pruning delete the new run's checkpoints.
- ``resume`` continues from the newest readable checkpoint and compares the config against the one
  that checkpoint was written under, key by key: keys in ``APPLIED`` take effect (the learning rate
  and schedule continue from the current point instead of jumping), every other change is refused
  with an error naming the keys, because the restored optimizer, sampler and RNG state would
  silently keep the old behaviour.
- ``config.json`` is always the config in effect; ``config_history.jsonl`` gets one line per start
  (step, checkpoint resumed from, changed keys, full config), so no setting is recorded that was
  not used.

Public API: ``open_run``, ``RunStart``, ``RunDirError``, ``apply_resumed_optim``, ``record_config``,
``schedule_factor``, ``APPLIED``, ``RUN_FILES``.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from .checkpoint import checkpoints, load_config_json, load_latest
from .config import OptimConfig, RunConfig, complete_config_dict, config_to_dict
from .files import write_atomic
from .learn import Learner, decay, lr_lambda
from .metrics import METRICS_FILE, SAMPLES_FILE
from .timeline import TIMELINE_FILE

HISTORY_FILE = "config_history.jsonl"
RUN_FILES = (METRICS_FILE, TIMELINE_FILE, SAMPLES_FILE, "config.json", HISTORY_FILE, "checkpoints", "tensorboard",
             "wandb", "plots")
# Keys a resumed run may change; they are applied from the next step on. Prefixes end with ".". The
# pipeline modes keep no state of their own (async in-flight rollouts are dropped at a checkpoint), nor does
# sharding (checkpoints hold full state dicts). "*" matches one key part.
APPLIED = ("optim.lr", "optim.steps", "optim.min_lr_ratio", "optim.weight_decay", "optim.grad_clip",
           "optim.max_consecutive_skips", "checkpoint.", "metrics.", "eval.", "run.threads", "run.out_dir",
           "run.device", "loss.backend", "rollout.decode", "run.pipeline", "run.max_staleness",
           "run.importance_clip", "student.gradient_checkpointing", "student.local_files_only", "run.parallel",
           "teachers.*.shard")
_SCHEDULE_KEYS = ("optim.steps", "optim.min_lr_ratio")


class RunDirError(ValueError):
    """The run directory and the requested start do not fit together; the message says how to proceed."""


@dataclass
class RunStart:
    """Where a run starts: its checkpoint (``None`` = from scratch), restored state, and what changed."""

    run_id: str
    checkpoint: Path | None = None
    state: dict[str, Any] | None = None
    saved_config: dict[str, Any] | None = None
    changed: dict[str, list[Any]] = field(default_factory=dict)  # key -> [old, new], all in APPLIED
    replaces: bool = False  # --overwrite of a previous run: deleted by ``record_config``, once start-up passed


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _applied(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) or ("*" in a and fnmatchcase(key, a))
               for a in APPLIED)


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """Dotted key -> [saved value, new value] for every differing key (``None`` = absent)."""
    a, b = _flatten(saved), _flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def used(out: Path) -> list[str]:
    """The run files already in ``out`` (empty: nothing a run wrote is there)."""
    found = [name for name in (METRICS_FILE, "config.json", HISTORY_FILE) if (out / name).exists()]
    found += [f"checkpoints/{p.name}" for p in checkpoints(out)]
    return found


def open_run(config: RunConfig, *, resume: bool, overwrite: bool) -> RunStart:
    """Check ``config.run.out_dir`` against the requested start; with ``resume``, load and vet the checkpoint."""
    out = Path(config.run.out_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: resume continues the run in "
                          f"{out}, overwrite deletes it")
    existing = used(out)
    if not resume:
        if existing and not overwrite:
            raise RunDirError(
                f"run directory {out} already holds a run ({', '.join(existing[:4])}); pass --resume to continue "
                "it, --overwrite to delete it and start over, or choose another run.out_dir"
            )
        return RunStart(run_id=uuid.uuid4().hex, replaces=bool(existing))
    found = load_latest(out)
    if found is None:
        print(f"opd-fast: no checkpoint under {out}/checkpoints; starting from scratch")
        return RunStart(run_id=uuid.uuid4().hex)
    path, state = found
    saved = load_config_json(path)
    if saved is None and (out / "config.json").is_file():
        saved = json.loads((out / "config.json").read_text())
    start = RunStart(run_id=state.get("run_id") or uuid.uuid4().hex, checkpoint=path, state=state,
                     saved_config=saved)
    if saved is None:
        return start
    changes = config_changes(complete_config_dict(saved), config_to_dict(config))
    refused = {k: v for k, v in changes.items() if not _applied(k)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise RunDirError(
            f"--resume from {path}: these config keys differ from the run's and cannot change mid-run (the "
            f"restored optimizer, sampler and RNG state would silently keep the old behaviour): {listed}. "
            "Restore them, or start a new run in another run.out_dir"
        )
    if config.optim.steps < state["step"]:
        raise RunDirError(f"config key 'optim.steps' = {config.optim.steps} is below the checkpoint's step "
                          f"{state['step']} ({path})")
    start.changed = changes
    return start


def schedule_factor(step: int, optim: OptimConfig, anchor: list[float] | None) -> float:
    """The lr multiplier at ``step``: warm-up + cosine, or after a schedule change on resume, a cosine
    from the multiplier at the resume point (``anchor`` = [step, factor]) down to ``min_lr_ratio``."""
    if anchor is None:
        return lr_lambda(step, optim.warmup_steps, optim.steps, optim.min_lr_ratio, optim.schedule)
    s0, f0 = int(anchor[0]), float(anchor[1])
    progress = min(1.0, max(0, step - s0) / max(1, optim.steps - s0))
    return optim.min_lr_ratio + (f0 - optim.min_lr_ratio) * decay(optim.schedule, progress)


def apply_resumed_optim(learner: Learner, config: RunConfig, start: RunStart) -> list[float] | None:
    """Make the restored optimizer follow the resumed config; returns the schedule anchor to checkpoint.

    The restored optimizer/scheduler state carries the old learning rate and schedule: the new
    ``optim.lr`` and ``optim.weight_decay`` replace them, and a changed ``optim.steps`` or
    ``optim.min_lr_ratio`` re-stretches the remaining decay from the current multiplier, so the
    learning rate is continuous across the resume (bar an explicit ``optim.lr`` change)."""
    state, saved = start.state or {}, start.saved_config or {}
    anchor = state.get("schedule")
    if start.checkpoint is None or (not start.changed and anchor is None):
        return anchor
    new = config.optim
    sched = learner.scheduler
    step = sched.last_epoch
    if any(k in start.changed for k in _SCHEDULE_KEYS) and step >= new.warmup_steps:
        old = OptimConfig(**{**vars(new), **saved.get("optim", {})})
        anchor = [step, schedule_factor(step, old, anchor)]
    fixed = anchor

    def factor(s: int) -> float:
        return schedule_factor(s, new, fixed)

    sched.lr_lambdas = [factor for _ in sched.lr_lambdas]
    sched.base_lrs = [new.lr for _ in sched.base_lrs]
    for group in learner.optimizer.param_groups:
        group["initial_lr"] = new.lr
        group["lr"] = new.lr * factor(step)
        group["weight_decay"] = new.weight_decay
    sched._last_lr = [g["lr"] for g in learner.optimizer.param_groups]  # what get_last_lr() reports
    return anchor


def record_config(config: RunConfig, start: RunStart, step: int) -> None:
    """``config.json`` := the config in effect; one ``config_history.jsonl`` line for this start.

    Called once start-up checks passed: a replaced run's files are deleted here, so a start that fails
    (bad verifier, unloadable model) leaves the previous run intact."""
    out = Path(config.run.out_dir)
    if start.replaces:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(config)
    write_atomic(out / "config.json", json.dumps(data, indent=2))
    entry = {"start_step": step, "run_id": start.run_id,
             "resumed_from": None if start.checkpoint is None else str(start.checkpoint),
             "changed": start.changed, "config": data}
    history = out / HISTORY_FILE
    previous = history.read_text() if history.is_file() else ""
    write_atomic(history, previous + json.dumps(entry) + "\n")
