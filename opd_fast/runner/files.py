"""Durable file writes: a file or directory is only safe from a crash or power loss once fsynced.

Public API: ``fsync_path``, ``write_atomic``, ``read_jsonl``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's entries to the disk (a rename is only durable after the directory's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a crash leaves the old content or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL log (none when it does not exist). A torn last line (what a full disk or a power
    loss leaves) is dropped with a warning; a broken line anywhere else is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for i, (lineno, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{lineno}: invalid JSON in a {path.stem} row: {exc}") from exc
            warnings.warn(f"{path}:{lineno}: dropping a torn last {path.stem} line ({line[:60]!r})", stacklevel=3)
    return rows
