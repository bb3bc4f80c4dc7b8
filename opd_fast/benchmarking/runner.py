"""The case loop: for each shape x dtype, check, measure in subprocesses, then time interleaved.

Order within a case: skip what cannot run (missing peer, unsupported divergence, would not fit),
check every loss against the reference on the case's inputs, measure first call and peak memory
in a fresh process per implementation, then time warm runs of all survivors interleaved in this
process. Nothing is timed that failed its check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import correctness
from .implementations import FLOOR, Implementation
from .inputs import make_inputs
from .memory import MB, available_bytes, estimate_bytes, fit_problem
from .shapes import Shape
from .timing import Timing, interleaved
from .worker import WorkerSpec, run_in_subprocess

Log = Callable[[str], None]
OnCase = Callable[[list["CaseResult"]], None]


@dataclass
class BenchConfig:
    """Everything a run depends on (recorded in the JSON)."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    seed: int = 0
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 3
    max_case_seconds: float = 240.0
    check: bool = True


@dataclass
class CaseResult:
    """One implementation at one shape and dtype. ``status``: ok, skipped, oom, incorrect, too-slow, error."""

    shape: Shape
    dtype: str
    impl: str
    status: str = "ok"
    reason: str = ""
    rel_err: float | None = None
    first_call_s: float | None = None
    peak_extra_mb: float | None = None
    estimated_mb: float | None = None
    runs_s: list[float] = field(default_factory=list)
    ratio_to_floor: float | None = None

    @property
    def timed(self) -> Timing | None:
        return Timing(tuple(self.runs_s)) if self.runs_s else None

    def fail(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason


def _precheck(impls: list[Implementation], shape: Shape, dtype: str, cfg: BenchConfig) -> list[CaseResult]:
    """Results with skips for what cannot run here or cannot fit."""
    available = available_bytes(torch.device(cfg.device))
    results = []
    for impl in impls:
        res = CaseResult(shape, dtype, impl.name)
        estimate = estimate_bytes(impl, shape, dtype)
        res.estimated_mb = None if estimate is None else estimate / MB
        if reason := impl.unavailable(cfg.divergence):
            res.fail("skipped", reason)
        elif reason := fit_problem(estimate, available):
            res.fail("oom", reason)
        results.append(res)
    return results


def _check_all(impls: dict[str, Implementation], results: list[CaseResult], cfg: BenchConfig, log: Log) -> None:
    """Each loss against the float64 reference on the case's own inputs; failures are not timed."""
    pending = [r for r in results if r.status == "ok" and impls[r.impl].make_loss is not None]
    if not pending:
        return
    shape, dtype = pending[0].shape, pending[0].dtype
    inputs = make_inputs(shape, dtype, cfg.seed, cfg.device)
    want = correctness.reference_outputs(inputs, cfg.divergence, cfg.beta)
    for res in pending:
        try:
            outcome = correctness.check(impls[res.impl], inputs, dtype, cfg.divergence, cfg.beta, want)
        except Exception as exc:  # a peer raising on valid inputs is a result to report, not a crash
            res.fail("error", f"{type(exc).__name__}: {exc}"[:300])
            continue
        res.rel_err = outcome.max_rel_err
        if not outcome.ok:
            res.fail("incorrect", f"max relative error {outcome.max_rel_err:.2e} > {outcome.tolerance:.0e}")
        log(f"  check {res.impl:<16} rel err {outcome.max_rel_err:.1e} {'ok' if outcome.ok else 'FAILED'}")


def _measure_all(results: list[CaseResult], cfg: BenchConfig, log: Log) -> None:
    """First call and extra peak memory, each in a fresh process."""
    for res in results:
        if res.status != "ok":
            continue
        spec = WorkerSpec(res.impl, res.shape, res.dtype, cfg.seed, cfg.divergence, cfg.beta, cfg.device)
        out = run_in_subprocess(spec, timeout=2 * cfg.max_case_seconds)
        if out["status"] != "ok":
            res.fail(out["status"], out["reason"])
        else:
            res.first_call_s = out["first_call_s"]
            res.peak_extra_mb = out["peak_extra_bytes"] / MB
            if res.first_call_s > cfg.max_case_seconds:
                res.fail("too-slow", f"first call took {res.first_call_s:.0f} s > {cfg.max_case_seconds:.0f} s budget")
        log(f"  first call {res.impl:<16} {res.first_call_s or float('nan'):8.2f} s  "
            f"peak +{res.peak_extra_mb or float('nan'):8.0f} MB  {res.status} {res.reason}")


def _time_all(impls: dict[str, Implementation], results: list[CaseResult], cfg: BenchConfig, log: Log) -> None:
    """Warm-up rounds, then as many timed rounds (up to ``repeats``) as fit in the case budget.

    With ``warmup=0`` the implementations that compile still get one warm-up call: their first
    call in this process would otherwise be timed as a compile.
    """
    live = [r for r in results if r.status == "ok"]
    if not live:
        return
    shape, dtype = live[0].shape, live[0].dtype
    inputs = make_inputs(shape, dtype, cfg.seed, cfg.device)
    steps = {r.impl: impls[r.impl].step(cfg.divergence, cfg.beta) for r in live}
    warm = interleaved(steps, inputs, cfg.warmup) if cfg.warmup else {}
    compiling = {name: steps[name] for name in steps if impls[name].compiles and name not in warm}
    warm.update(interleaved(compiling, inputs, 1))
    round_s = sum(t.max for t in warm.values()) + sum(r.first_call_s or 0.0 for r in live if r.impl not in warm)
    rounds = max(1, min(cfg.repeats, math.floor(cfg.max_case_seconds / max(round_s, 1e-9))))
    if rounds < cfg.repeats:
        log(f"  {rounds} timed round(s) instead of {cfg.repeats}: one round takes ~{round_s:.0f} s")
    for name, timing in interleaved(steps, inputs, rounds).items():
        next(r for r in live if r.impl == name).runs_s = list(timing.runs)
    floor = next((r.timed for r in live if r.impl == FLOOR), None)
    for res in live:
        if floor is not None:
            res.ratio_to_floor = res.timed.median / floor.median


def run_case(
    impls: list[Implementation], shape: Shape, dtype: str, cfg: BenchConfig, log: Log, timed: bool = True
) -> list[CaseResult]:
    """Every implementation at one shape and dtype (``timed=False``: first call and memory only)."""
    by_name = {impl.name: impl for impl in impls}
    log(f"{shape.label} {dtype}")
    results = _precheck(impls, shape, dtype, cfg)
    if cfg.check:
        _check_all(by_name, results, cfg, log)
    _measure_all(results, cfg, log)
    if timed:
        _time_all(by_name, results, cfg, log)
    return results


def _over_cases(cases, impls, cfg: BenchConfig, log: Log, timed: bool, on_case: OnCase | None) -> list[CaseResult]:
    results: list[CaseResult] = []
    for shape, dtype in cases:
        results += run_case(impls, shape, dtype, cfg, log, timed=timed)
        if on_case is not None:
            on_case(results)
    return results


def run_loss_bench(
    impls: list[Implementation], shapes: list[Shape], dtypes: list[str], cfg: BenchConfig, log: Log = print,
    on_case: OnCase | None = None,
) -> list[CaseResult]:
    """``run_case`` over shapes x dtypes, in the given order; ``on_case(results so far)`` after each."""
    return _over_cases([(s, d) for s in shapes for d in dtypes], impls, cfg, log, True, on_case)


def run_memory_bench(
    impls: list[Implementation], shapes: list[Shape], dtype: str, cfg: BenchConfig, log: Log = print,
    on_case: OnCase | None = None,
) -> list[CaseResult]:
    """Extra peak memory (and first-call time) per shape, no timed rounds."""
    return _over_cases([(s, dtype) for s in shapes], impls, cfg, log, False, on_case)
