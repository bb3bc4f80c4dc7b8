"""Async mode: rollouts run up to ``run.max_staleness`` optimizer steps ahead of the learner.

A producer thread owns a snapshot of the student (a deep copy) and rolls out step after step into a
queue; the learner takes a step's rollouts, scores and learns from them, and after its optimizer step
publishes the new trainable weights, which the producer loads before its next step. The producer starts
the rollouts of step ``k`` only once the learner has published version ``k - 1 - s`` (``s`` =
``max_staleness``; version ``v`` = the weights after ``v`` optimizer steps), so every sample the learner
takes has ``staleness = (k - 1) - version <= s`` by construction and no rollout is computed only to be
thrown away. All samples of a step come from one version, so the per-sample staleness logged
(``async/staleness``) is that step's.

What is dropped: rollouts still in flight (produced, not yet learned from) when a checkpoint is written
are not saved; the sampler and RNG state saved with it are the producer's, after drawing them, so a
resumed run starts with fresh prompts and counts the in-flight samples in ``async/dropped_samples``.
Async runs are not bit-reproducible: which weights version a step samples from depends on thread timing
(within the bound).

Memory: a second copy of the student (the snapshot) and, per update, one staged copy of its trainable
weights (for LoRA, only the adapters).

Threads: the producer gets the larger share of ``run.threads`` (rollout is most of a step) and the
learner the rest, as ``pipeline.split_threads`` splits them. On CUDA both threads issue kernels to the
same default stream, which orders them, so the weight hand-off needs no events; the overlap there is
the host side of each stage.

Public API: ``StepRollouts``, ``RolloutProducer``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .data import Prompt
from .models import LoadedModel
from .rollout import RolloutBatch


@dataclass
class StepRollouts:
    """One step's prompts (by micro-batch), their rollouts, and the weights version that sampled them."""

    step: int
    off_policy: bool
    micro: list[list[Prompt]]
    batches: list[RolloutBatch]
    version: int

    @property
    def samples(self) -> int:
        return sum(len(mb) for mb in self.micro)


RollFn = Callable[[int, LoadedModel], StepRollouts]


class RolloutProducer:
    """Runs ``roll(step, snapshot)`` for steps ``start + 1 .. last`` on a thread, ``max_staleness`` ahead.

    ``max_staleness = 0`` is lockstep (each step's rollouts wait for the previous update): no overlap, the
    serial loop's samples; it exists to show that the hand-off itself changes nothing."""

    def __init__(self, roll: RollFn, student: LoadedModel, *, start: int, last: int, max_staleness: int,
                 threads: int) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self._student = student
        self.snapshot = dataclasses.replace(student, model=copy.deepcopy(student.model))
        self.snapshot.decoder = _same_submodule(student.model, student.decoder, self.snapshot.model)
        self._trainable = [n for n, p in student.model.named_parameters() if p.requires_grad]
        self._published = start  # latest version the learner published
        self._snapshot_version = start
        self._staged: dict[str, torch.Tensor] | None = None
        self._cond = threading.Condition()
        self._busy = threading.Lock()  # held while a step is being produced; pause() takes it
        self._queue: queue.Queue = queue.Queue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(roll, start, last, threads), name="rollout-worker",
                                        daemon=True)
        self._thread.start()

    def _run(self, roll: RollFn, start: int, last: int, threads: int) -> None:
        torch.set_num_threads(threads)
        for step in range(start + 1, last + 1):
            with self._cond:
                self._cond.wait_for(lambda s=step: self._stop or self._published >= s - 1 - self.max_staleness)
                if self._stop:
                    return
            with self._busy:
                try:
                    self._refresh()
                    plan = roll(step, self.snapshot)
                    plan.version = self._snapshot_version
                    self._queue.put((plan, None))
                except Exception as exc:  # handed to the learner, which raises it
                    self._queue.put((None, exc))
                    return

    def _refresh(self) -> None:
        """Load the latest published weights into the snapshot (producer thread, between steps)."""
        with self._cond:
            staged, version, self._staged = self._staged, self._published, None
        if staged is not None:
            params = dict(self.snapshot.model.named_parameters())
            with torch.no_grad():
                for name, value in staged.items():
                    params[name].copy_(value)
        self._snapshot_version = version

    def take(self) -> StepRollouts:
        """The next step's rollouts (blocks until produced); re-raises the producer's error."""
        plan, exc = self._queue.get()
        if exc is not None:
            raise exc
        return plan

    def publish(self, version: int) -> None:
        """After the learner's optimizer step: stage the student's trainable weights as ``version``."""
        params = dict(self._student.model.named_parameters())
        staged = {name: params[name].detach().clone() for name in self._trainable}
        with self._cond:
            self._staged, self._published = staged, version
            self._cond.notify_all()

    @property
    def in_flight_samples(self) -> int:
        """Samples rolled out and not yet taken by the learner."""
        return sum(plan.samples for plan, _ in list(self._queue.queue) if plan is not None)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No step is being produced inside the block: the sampler and RNG state are at a step boundary."""
        with self._busy:
            yield

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> RolloutProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_submodule(root: torch.nn.Module, sub: torch.nn.Module, copy_root: torch.nn.Module) -> torch.nn.Module:
    """The module of ``copy_root`` at the path where ``sub`` sits in ``root``."""
    for name, module in root.named_modules():
        if module is sub:
            return copy_root.get_submodule(name)
    raise ValueError("the student's decoder is not a submodule of its model")
