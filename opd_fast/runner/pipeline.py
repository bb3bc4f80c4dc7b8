"""Strict pipelining: a stage on its own worker thread, fed in order through a bounded queue.

Strict mode (``run.pipeline = "strict"``, the default) keeps every sample of step k on the weights after step
k-1 and changes no computation, only when it runs: the teachers forward micro-batch i's prompts on a worker
thread as soon as its decoding starts, then its completions on those prompt caches once they exist, while the
student samples micro-batch i+1; the student learns from the scored micro-batches while the teachers score the
rest. With ``rollout.handoff_fraction`` > 0, rows that finish early leave the decode batch in groups and the
worker scores each group while the others still decode (``rollout.py``, ``score.py``); the serial loop scores
the same groups afterwards, so results do not depend on the mode. Learning cannot start before the last
rollout because every term is normalized by the step's completion-token count (and learning while the same
student samples would share its weights and train/eval mode between two threads); async mode
(``async_rollout.py``) is what overlaps learning with rollouts. Scoring is one stage behind the rollouts, so
with two or more micro-batches per step it is hidden except for the last micro-batch's, which overlaps the
first learning micro-steps. A step of one micro-batch overlaps only its early groups and its prompts' prefill,
and only with early groups configured: on 2 CPU cores the prefill alone, with half the threads, took longer
than the decode it hid behind (``bench/profile_stages.py``), so without early groups such a step runs the
serial loop.

Threads: while the worker has work it gets ``max(1, T // 4)`` torch intra-op threads and the main thread the
rest (``T`` = ``run.threads``, or torch's count), so the two never ask for more than ``T`` cores; once the
last micro-batch is scored, the main thread learns with all ``T``. With ``T = 1`` both get one, i.e. two cores
(``run.pipeline = "serial"`` stays on one). A step of one micro-batch without early groups runs serially with
all ``T`` threads; with them, its last group is scored on the main thread with all ``T``. Results equal the
serial loop's bit for bit when each thread's count equals the serial run's (``T = 1``); with more threads, CPU
kernels may split reductions differently, which changes rounding only. On CUDA the worker thread issues its
kernels to the same (default) stream, so the overlap hides the host side of each stage (Python, kernel
launches), not GPU time.

Public API: ``StageWorker``, ``split_threads``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

_DONE = object()


def split_threads(total: int) -> tuple[int, int]:
    """(main thread, worker thread) intra-op thread counts out of ``total`` (see the module docstring)."""
    worker = max(1, total // 4)
    return max(1, total - worker), worker


class StageWorker:
    """Applies ``fn`` to submitted items in order on one thread; ``result()`` returns them in order.

    At most ``depth`` items wait for the worker (``submit`` blocks beyond that: a bounded queue); an
    exception in ``fn`` is raised again by the ``result()`` of its item. Use as a context manager."""

    def __init__(self, fn: Callable[[Any], Any], threads: int, depth: int = 2, name: str = "stage-worker") -> None:
        self._in: queue.Queue = queue.Queue(depth)
        self._out: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(fn, threads), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[Any], Any], threads: int) -> None:
        torch.set_num_threads(threads)  # per thread: the main thread keeps its own count
        for item in iter(self._in.get, _DONE):
            try:
                self._out.put((fn(item), None))
            except Exception as exc:  # handed to the consumer, which raises it
                self._out.put((None, exc))

    def submit(self, item: Any) -> None:
        self._in.put(item)

    def result(self) -> Any:
        value, exc = self._out.get()
        if exc is not None:
            raise exc
        return value

    def close(self) -> None:
        self._in.put(_DONE)
        self._thread.join()

    def __enter__(self) -> StageWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def main_threads(count: int) -> Iterator[None]:
    """The calling thread's intra-op thread count for a block, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
