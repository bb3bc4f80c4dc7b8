"""Extra peak memory of one step, and whether a case can fit at all.

CPU: Linux's peak-RSS high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``
right before the step, minus the RSS with the inputs already allocated. CUDA: the caching
allocator's ``max_memory_allocated`` minus what was allocated before. Either way the number is
what the step adds on top of its inputs (gradients included), measured in a process that ran
nothing else (see ``worker``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .implementations import Implementation
from .shapes import DTYPES, Shape

MB = 2**20
# A case is skipped when its estimate exceeds this share of the memory available now.
FIT_FRACTION = 0.85

_PROC = Path("/proc/self")


def _status_kib(field: str) -> int | None:
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMeter:
    """``start()`` before the step, ``extra_bytes()`` after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) delta"
        self._base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        try:  # "5" resets the peak RSS (Linux >= 4.0)
            (_PROC / "clear_refs").write_text("5")
        except OSError as exc:
            raise RuntimeError(f"cannot reset the peak RSS through /proc/self/clear_refs ({exc})") from exc
        self._base = (_status_kib("VmRSS") or 0) * 1024

    def extra_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        return (_status_kib("VmHWM") or 0) * 1024 - self._base


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new case on ``device`` now (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kib = int(line.split()[1])
    except OSError:
        return None
    return None if kib is None else kib * 1024


def estimate_bytes(impl: Implementation, shape: Shape, dtype: str) -> int | None:
    """What ``impl`` needs for its ``N x V`` buffers at this shape (None: it never holds them)."""
    if impl.logit_bytes is None:
        return None
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return int(impl.logit_bytes(itemsize) * shape.n * shape.v)


def fit_problem(estimate: int | None, available: int | None) -> str:
    """Why a case with this estimate cannot run now ("" when it can or nobody knows)."""
    if estimate is None or available is None or estimate <= FIT_FRACTION * available:
        return ""
    return f"would need ~{estimate / 2**30:.1f} GiB for its N x V buffers, {available / 2**30:.1f} GiB available"
