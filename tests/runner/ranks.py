"""Training runs on a torchrun-like group of processes, with a deadline instead of a hang.

Each rank gets the environment torchrun would set and runs ``train`` for each ``Run`` in order; what a run
returns (its summary, or the error it raised, as ``"Type: message"``) comes back per rank. The runs are on
the CPU (gloo); ``OPD_TEST_DIST_BACKEND=nccl`` puts them on CUDA, one GPU per rank (nccl), through ``DEVICE``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from opd_fast.runner.config import RunConfig
from opd_fast.runner.trainer import train

TIMEOUT_S = 300  # the spawned group is killed past this: a hang fails the test instead of blocking CI
DEVICE = "cuda" if os.environ.get("OPD_TEST_DIST_BACKEND", "gloo") == "nccl" else "cpu"  # the runs' run.device


@dataclass(frozen=True)
class Run:
    name: str
    config: RunConfig
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of ``train``


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port(rank: int, results: str, run: int) -> int:
    """The run's rendezvous port: picked by rank 0 right before the run (a port picked earlier may have been
    taken since, e.g. by a gloo connection of the previous run), read by the others from a file."""
    path = Path(results, f"port{run}")
    if rank == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(_free_port()))
        tmp.replace(path)  # atomic: the others never read a partial file
    while not path.exists():
        time.sleep(0.05)
    return int(path.read_text())


def _rank(rank: int, world: int, runs: list[Run], results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out: dict[str, object] = {}
    for i, run in enumerate(runs):
        # a port per run: a rank done with one run must not reach the store of the previous one, still served
        # by a rank that has not finished it
        os.environ["MASTER_PORT"] = str(_port(rank, results, i))
        try:
            out[run.name] = train(run.config, **run.options)
        except Exception as exc:  # the test asserts which error each rank saw
            out[run.name] = f"{type(exc).__name__}: {exc}"
    Path(results, f"rank{rank}.json").write_text(json.dumps(out))


def run_ranks(world: int, runs: list[Run], results: Path) -> list[dict]:
    """Every rank's results, in rank order."""
    results.mkdir(parents=True, exist_ok=True)
    ctx = mp.spawn(_rank, args=(world, runs, str(results)), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process run did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(world)]


COMPARED = ("loss", "tokens", "completion_len", "truncation_rate", "student_entropy", "grad_norm", "lr")
PER_KEY = ("divergence/", "token_share/", "entropy/teacher/")  # per teacher and domain drawn


def assert_same_steps(expected: list[dict], got: list[dict], rel: float = 1e-5) -> None:
    """The same training rows step by step: losses, gradient norms and the per-teacher / per-domain metrics."""
    expected, got = ([r for r in rows if r.get("kind") != "eval"] for rows in (expected, got))
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for want, row in zip(expected, got, strict=True):
        per_key = sorted(k for k in want if k.startswith(PER_KEY))
        assert per_key == sorted(k for k in row if k.startswith(PER_KEY)) and per_key
        for key in (*COMPARED, *per_key):
            assert row[key] == pytest.approx(want[key], rel=rel, abs=1e-7), (row["step"], key)
