"""Wall-clock timing of forward + backward steps, interleaved across implementations.

On a shared machine load drifts over minutes; timing A A A B B B would charge the drift to one
side. Each round runs every implementation once, in an order rotated per round, and the
report keeps the median with min and max. Warm-up is just a round whose times are discarded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .inputs import BenchInputs

Step = Callable[[BenchInputs], None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(step: Step, inputs: BenchInputs) -> float:
    """Seconds for one step, device work included."""
    device = inputs.hs.device
    _sync(device)
    start = time.perf_counter()
    step(inputs)
    _sync(device)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Timing:
    """Seconds of every timed run of one implementation."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def max(self) -> float:
        return max(self.runs)


def interleaved(steps: dict[str, Step], inputs: BenchInputs, rounds: int) -> dict[str, Timing]:
    """``rounds`` rounds; each runs every step once, in an order rotated by one per round."""
    names = list(steps)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            runs[name].append(time_once(steps[name], inputs))
    inputs.clear_grads()
    return {name: Timing(tuple(values)) for name, values in runs.items()}
