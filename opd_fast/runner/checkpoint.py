"""Checkpoints: atomic, durable, resumable, pruned, and unable to run code when loaded.

A checkpoint is ``RUN_DIR/checkpoints/step-XXXXXXXX/`` holding ``student/`` (``save_pretrained``,
safetensors, with the tokenizer; only the adapter for LoRA students), ``state.safetensors`` (every
tensor of the trainer state: optimizer moments, RNG states), ``state.json`` (the rest: step, counters,
sampler, python RNG tuples, the run id) and ``config.json`` (the config that produced it). Neither
file format can execute code when read, so resuming a run directory from elsewhere is safe; a
checkpoint stored as a pickle (``state.pt``) is refused rather than unpickled.

Writing goes into a ``.tmp-*`` sibling, every file and the directory are fsynced, then one
``os.replace`` commits it and the parent directory is fsynced, so a crash or power loss at any
moment leaves either the previous complete checkpoint or the new one under a real name; leftover
``.tmp-*`` directories are ignored and cleaned up. Pruning keeps the last ``keep`` checkpoints of
the current run (same run id) and never touches another run's. ``load_latest`` falls back to the
previous checkpoint, with a warning, when the newest cannot be read.

Public API: ``save_checkpoint``, ``latest_checkpoint``, ``find_checkpoint``, ``checkpoints``, ``load_latest``,
``load_state``, ``load_config_json``, ``rng_state``, ``set_rng_state``, ``CheckpointError``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .files import fsync_path
from .models import LoadedModel

PREFIX = "step-"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
CONFIG_JSON = "config.json"
PICKLED_STATE = "state.pt"  # the old, code-executing format: refused


class CheckpointError(ValueError):
    """A checkpoint that cannot (or must not) be loaded; the message names its path."""


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


# -- code-free serialization of the trainer state ----------------------------------------------
# JSON cannot hold tensors, arrays, tuples or dicts with int keys, so they become tagged objects
# ({"__tensor__": key} points into the safetensors file). Loading accepts only these tags.


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value.copy())
        return {"__ndarray__": key, "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint's state: {value!r}")


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, where) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value["__items__"]}
    tags = [k for k in value if k.startswith("__")]
    if tags:
        raise CheckpointError(f"{where}: unknown tag {tags[0]!r} in the checkpoint state")
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def _rename(src: Path, dst: Path) -> None:
    """The commit point of a checkpoint (a separate function so tests can interrupt right before it)."""
    os.replace(src, dst)


def save_checkpoint(run_dir: str | Path, step: int, student: LoadedModel, state: dict[str, Any], keep: int,
                    config: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write student + trainer state (+ the config in effect) for ``step`` durably; prune to the last ``keep``.

    ``state["run_id"]`` (when given) marks the checkpoint as the current run's: only those are pruned.
    ``weights`` is the student's full state dict when its parameters are sharded (written in their place)."""
    for p in (student.model.parameters() if weights is None else weights.values()):
        if not torch.isfinite(p).all():
            raise RuntimeError(f"refusing to checkpoint step {step}: the student has non-finite weights")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.model.save_pretrained(tmp / "student", safe_serialization=True, state_dict=weights)
    student.tokenizer.save_pretrained(tmp / "student")
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode({**state, "step": step}, tensors)
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(encoded))
    if config is not None:
        (tmp / CONFIG_JSON).write_text(json.dumps(config, indent=2))
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. interrupted right after a periodic save)
        shutil.rmtree(final)
    _rename(tmp, final)
    fsync_path(root)
    run_id = state.get("run_id")
    ours = [p for p in _complete(root) if run_id is None or _run_id(p) == run_id]
    for old in ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _run_id(path: Path) -> str | None:
    try:
        return json.loads((path / STATE_JSON).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _complete(root: Path) -> list[Path]:
    """Committed checkpoints (either state format, so a pickled one is found and refused, not skipped)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and ((p / STATE_JSON).is_file() or (p / PICKLED_STATE).is_file())]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Every committed checkpoint of ``run_dir``, oldest first."""
    return _complete(checkpoint_dir(run_dir))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; stale temp dirs from an interrupted save are removed."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    found = _complete(root)
    return found[-1] if found else None


def find_checkpoint(run_dir: str | Path, spec: str) -> Path:
    """The checkpoint ``spec`` names in ``run_dir``: ``"latest"``, a checkpoint name (``step-00000010``) or a
    checkpoint directory; a missing one (never written, or pruned by ``checkpoint.keep``) is an error
    listing what exists."""
    if spec == "latest":
        path = latest_checkpoint(run_dir)
    else:
        path = Path(spec) if Path(spec).is_dir() else checkpoint_dir(run_dir) / spec
    if path is not None and (path / STATE_JSON).is_file():
        return path
    names = [p.name for p in checkpoints(run_dir)] or "none"
    what = "checkpoint" if spec == "latest" else f"checkpoint {spec!r}"
    raise CheckpointError(f"no {what} under {checkpoint_dir(run_dir)} (never written, or pruned by "
                          f"checkpoint.keep); checkpoints there: {names}")


def _check_safetensors(path: Path) -> None:
    """A truncated weights file (power loss before fsync on another system) fails here, not mid-load."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise CheckpointError(f"{path}: safetensors file is {size} bytes, its header describes {8 + n + end}")


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, read without executing anything from it.

    Raises ``CheckpointError`` naming the file when the state is missing, unreadable or pickled."""
    path = Path(path)
    if not (path / STATE_JSON).is_file():
        if (path / PICKLED_STATE).is_file():
            raise CheckpointError(
                f"{path / PICKLED_STATE}: this checkpoint stores its state as a pickle, which can run arbitrary "
                f"code when loaded; opd-fast only reads {STATE_JSON} + {STATE_TENSORS} and refuses it"
            )
        raise CheckpointError(f"{path}: no {STATE_JSON} (not a checkpoint, or an incomplete one)")
    try:
        tensors = load_file(str(path / STATE_TENSORS))
        state = _decode(json.loads((path / STATE_JSON).read_text()), tensors, str(path))
    except CheckpointError:
        raise
    except Exception as exc:  # OSError, JSON errors, a missing tensor key, safetensors' own SafetensorError
        raise CheckpointError(f"{path}: unreadable checkpoint state: {exc}") from exc
    for weights in (path / "student").glob("*.safetensors"):
        _check_safetensors(weights)
    return state


def load_config_json(path: str | Path) -> dict[str, Any] | None:
    """The config a checkpoint was written under (``None`` for checkpoints without one)."""
    file = Path(path) / CONFIG_JSON
    return json.loads(file.read_text()) if file.is_file() else None


def load_latest(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint and its state; an unreadable newer one is skipped with a warning.

    A pickled checkpoint is never skipped silently: it is refused, since it says the directory holds
    state from elsewhere."""
    latest_checkpoint(run_dir)  # cleans stale temp dirs
    found = checkpoints(run_dir)
    for path in reversed(found):
        try:
            return path, load_state(path)
        except CheckpointError as exc:
            if (path / PICKLED_STATE).is_file():
                raise
            warnings.warn(f"skipping unreadable checkpoint {path} ({exc}); falling back to the previous one",
                          stacklevel=2)
    if found:
        raise CheckpointError(f"no readable checkpoint under {checkpoint_dir(run_dir)} (tried {len(found)})")
    return None
