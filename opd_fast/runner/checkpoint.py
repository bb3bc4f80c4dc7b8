"""Checkpoints: atomic, resumable, pruned.

A checkpoint is ``RUN_DIR/checkpoints/step-XXXXXXXX/`` holding ``student/`` (``save_pretrained``,
safetensors, with the tokenizer; only the adapter for LoRA students) and ``state.pt`` (optimizer,
scheduler, RNG states, step, data-sampler state, counters). It is written into a ``.tmp-*`` sibling
and renamed into place in one ``os.replace``, so a crash at any moment leaves either the previous
complete checkpoint or the new one, never a half-written directory under a real name; leftover
``.tmp-*`` directories are ignored and cleaned up. The last ``keep`` checkpoints are kept.

Public API: ``save_checkpoint``, ``latest_checkpoint``, ``load_state``, ``rng_state``, ``set_rng_state``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models import LoadedModel

PREFIX = "step-"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG the run draws from (global torch, python, numpy, and the rollout generator)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _rename(src: Path, dst: Path) -> None:
    """The commit point of a checkpoint (a separate function so tests can interrupt right before it)."""
    os.replace(src, dst)


def save_checkpoint(run_dir: str | Path, step: int, student: LoadedModel, state: dict[str, Any], keep: int) -> Path:
    """Write student + trainer state for ``step`` atomically; prune to the last ``keep``."""
    for p in student.model.parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"refusing to checkpoint step {step}: the student has non-finite weights")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.model.save_pretrained(tmp / "student", safe_serialization=True)
    student.tokenizer.save_pretrained(tmp / "student")
    torch.save({**state, "step": step}, tmp / "state.pt")
    if final.exists():  # re-saving a step (e.g. interrupted right after a periodic save)
        shutil.rmtree(final)
    _rename(tmp, final)
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; stale temp dirs from an interrupted save are removed."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    found = _complete(root)
    return found[-1] if found else None


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (our own file: python objects such as RNG tuples inside)."""
    return torch.load(Path(path) / "state.pt", weights_only=False)
