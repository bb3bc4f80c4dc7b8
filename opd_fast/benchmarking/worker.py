"""One case in a fresh process: first-call time and extra peak memory of one step.

A fresh process per case means nothing allocated by another case (or by an earlier compile of
this one) can hide in, or inflate, the peak. Run as
``python -m opd_fast.benchmarking.worker '<json spec>'``; prints one JSON object.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from .implementations import by_name
from .inputs import make_inputs
from .memory import PeakMeter
from .shapes import Shape
from .timing import time_once


@dataclass(frozen=True)
class WorkerSpec:
    impl: str
    shape: Shape
    dtype: str
    seed: int
    divergence: str
    beta: float
    device: str


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def measure(spec: WorkerSpec) -> dict:
    """Build the step (imports excluded), then time its first call and its extra peak memory."""
    device = torch.device(spec.device)
    step = by_name(spec.impl, device).step(spec.divergence, spec.beta)
    inputs = make_inputs(spec.shape, spec.dtype, spec.seed, device)
    meter = PeakMeter(device)
    meter.start()
    try:
        seconds = time_once(step, inputs)
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
        return {"status": "oom", "reason": f"out of memory: {str(exc).splitlines()[0][:200]}"}
    return {"status": "ok", "first_call_s": seconds, "peak_extra_bytes": meter.extra_bytes(), "method": meter.method}


def run_in_subprocess(spec: WorkerSpec, timeout: float | None = None) -> dict:
    """``measure`` in a fresh interpreter; a crash, kill or timeout comes back as a status."""
    payload = json.dumps({**asdict(spec), "shape": spec.shape.as_dict()})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "opd_fast.benchmarking.worker", payload],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        return {"status": "too-slow", "reason": f"first call did not finish within {timeout:.0f} s"}
    if proc.returncode == -9:
        return {"status": "oom", "reason": "killed by SIGKILL (the kernel's OOM killer)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "reason": f"worker exited {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def main(argv: list[str]) -> int:
    raw = json.loads(argv[0])
    spec = WorkerSpec(**{**raw, "shape": Shape(**raw["shape"])})
    print(json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
