"""User code named in a config: ``module:attr`` (importable) or ``path/file.py:attr`` (a file next to it).

Verifiers (``loss.verifiers``) and custom tasks (``data.task = "module:Class"``) are found this way.
Loading runs the module's code in the training process, as a config's ``trust_remote_code`` would:
only name code you trust.

Public API: ``load_object``, ``is_code_spec``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


def is_code_spec(spec: str) -> bool:
    """``module:attr`` / ``file.py:attr`` rather than a plain name."""
    module, _, attr = spec.rpartition(":")
    return bool(module) and bool(attr)


def _import(module: str) -> types.ModuleType:
    if not module.endswith(".py"):
        return importlib.import_module(module)
    path = Path(module)
    if not path.is_file():
        raise ImportError(f"no file {path}")
    name = f"opd_fast_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        sys.modules[name] = loaded
    return sys.modules[name]


def load_object(spec: str, key: str) -> Any:
    """The object ``spec`` names; a ``ValueError`` names the config ``key`` and what failed to import."""
    module, _, attr = spec.rpartition(":")
    try:
        return getattr(_import(module), attr)
    except (ImportError, AttributeError, OSError) as exc:
        raise ValueError(f"config key {key!r}: cannot import {spec!r}: {exc}") from exc
