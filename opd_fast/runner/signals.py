"""Signals during a run: SIGINT/SIGTERM stop it cleanly; a second Ctrl-C or an evaluation stops at once.

A clean stop finishes the current step and checkpoints it. An evaluation has nothing to save (the
checkpoint is written before it), so a signal abandons it instead of making the user wait; a second
SIGINT means "now": it raises ``KeyboardInterrupt`` and keeps only the previous checkpoint.

Public API: ``stop_on_signals``, ``StopSignals``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


class _Stopped(Exception):
    """Raised from the signal handler to abandon an evaluation (the checkpoint is already written)."""


class StopSignals:
    """SIGINT/SIGTERM set ``stop``: the loop finishes its step, checkpoints and returns. During an
    evaluation a signal abandons it at once (``_Stopped``); a second SIGINT force-quits
    (``KeyboardInterrupt``) without waiting for the step or a checkpoint."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.in_eval = False

    def handle(self, sig: int, _frame: Any) -> None:
        if sig == signal.SIGINT and self.stop.is_set():
            raise KeyboardInterrupt("second interrupt: quitting without a checkpoint of the current step")
        self.stop.set()
        if self.in_eval:
            raise _Stopped

    def evaluate(self, run: Callable[[], dict[str, float]]) -> dict[str, float] | None:
        """``run()`` (an evaluation), or ``None`` when a signal stops (or already stopped) it."""
        if self.stop.is_set():
            return None
        self.in_eval = True
        try:
            return run()
        except _Stopped:
            return None
        finally:
            self.in_eval = False


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopSignals]:
    """Install the handlers for the block (main thread only; elsewhere signals cannot be caught)."""
    signals = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    previous = {sig: signal.signal(sig, signals.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signals
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
