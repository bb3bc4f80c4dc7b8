"""Task plug-ins: prompt generators with references and a verifier.

A task is what the runner samples prompts from (when no prompt file is given) and what
evaluation scores completions with. Built-in tasks register themselves here by name;
``get_task(name)`` imports the built-ins on first use. A custom task is named by its class,
``"module:Class"`` or ``"path/file.py:Class"`` (``data.task`` or ``--task``): any class whose instances
have ``examples`` and ``verify`` as ``Task`` below, built without arguments (trusted code, imported
into the training process).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..plugins import is_code_spec, load_object

Message = dict[str, str]  # one chat turn: {"role": ..., "content": ...}


@dataclass(frozen=True)
class Example:
    """One prompt with its ground truth. ``domain`` routes it to a teacher. A conversation prompt (chat
    messages) is rendered with the tokenizer's chat template."""

    prompt: str | list[Message]
    reference: str
    domain: str = "default"


class Task(Protocol):
    name: str

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """``n`` deterministic examples of ``split`` ("train" / "eval"); splits never overlap."""
        ...

    def verify(self, prompt: str, completion: str, reference: str) -> float:
        """Score in [0, 1] of a completion (1 = correct)."""
        ...


_REGISTRY: dict[str, Callable[[], Task]] = {}
# Modules under opd_fast/tasks/ that register built-in tasks when imported.
BUILTIN_MODULES: tuple[str, ...] = ("column_add", "pair_sum")


def register_task(name: str) -> Callable[[Callable[[], Task]], Callable[[], Task]]:
    """Decorator registering a task factory under ``name``."""

    def deco(factory: Callable[[], Task]) -> Callable[[], Task]:
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def _custom_task(spec: str) -> Task:
    factory = load_object(spec, "data.task")
    task = factory() if callable(factory) else factory
    missing = [m for m in ("examples", "verify") if not callable(getattr(task, m, None))]
    if missing:
        raise ValueError(f"config key 'data.task' = {spec!r}: the task has no {' or '.join(missing)} method "
                         "(a task needs examples(split, n, seed) and verify(prompt, completion, reference))")
    return task


def get_task(name: str) -> Task:
    """A built-in task by name, or a custom one by ``module:Class`` / ``file.py:Class``."""
    if is_code_spec(name):
        return _custom_task(name)
    for module in BUILTIN_MODULES:
        importlib.import_module(f"opd_fast.tasks.{module}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()
