"""Running a function on a process group, with a deadline instead of a hang.

gloo on CPU by default; ``OPD_TEST_DIST_BACKEND=nccl`` runs the same tests on NCCL, one GPU per rank
(``device(rank)`` is where a rank's tensors go; results come back on the CPU).
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 180
BACKEND = os.environ.get("OPD_TEST_DIST_BACKEND", "gloo")


def device(rank: int) -> torch.device:
    return torch.device("cuda", rank) if BACKEND == "nccl" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[[int, int], object], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if BACKEND == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(BACKEND, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world)
    except BaseException:
        Path(out, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    torch.save(_on_cpu(result), Path(out, f"rank{rank}.pt"))


def _on_cpu(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    return obj


def run_group(fn: Callable[[int, int], object], world: int, tmp: Path) -> list:
    """``fn(rank, world)`` on ``world`` gloo processes; their results, in rank order."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, str(tmp)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(DEADLINE_S)
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in sorted(tmp.glob("error*.txt"))]
    if alive or errors or any(p.exitcode for p in procs):
        raise AssertionError(f"group run failed (ranks still running after {DEADLINE_S} s: {alive}; exit codes "
                             f"{[p.exitcode for p in procs]})\n" + "\n".join(errors))
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
