"""Task plug-ins: prompt generators with references and a verifier.

A task is what the runner samples prompts from (when no JSONL file is given) and what
evaluation scores completions with. Built-in tasks register themselves here by name;
``get_task(name)`` imports the built-ins on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Example:
    """One prompt with its ground truth. ``domain`` routes it to a teacher."""

    prompt: str
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
BUILTIN_MODULES: tuple[str, ...] = ("column_add",)


def register_task(name: str) -> Callable[[Callable[[], Task]], Callable[[], Task]]:
    """Decorator registering a task factory under ``name``."""

    def deco(factory: Callable[[], Task]) -> Callable[[], Task]:
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def get_task(name: str) -> Task:
    for module in BUILTIN_MODULES:
        importlib.import_module(f"opd_fast.tasks.{module}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()
