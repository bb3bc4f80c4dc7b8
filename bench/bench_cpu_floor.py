"""CPU speed and memory of the fused loss against its bare-GEMM floor (issue 5's targets).

For each shape and dtype, runs interleaved repeats of
  * the floor: the four GEMMs the loss needs, at full size with preallocated outputs
    (student logits h_s W_s^T, teacher logits h_t W_t^T, grad-hidden G W_s, grad-weight G^T h_s);
  * forward+backward of ``fused_linear_kl`` for each backend (``torch``, ``cpu``),
and prints medians with min-max plus the per-repeat ratio backend / floor (paired, so slow
drifts of a shared machine cancel). ``--phases`` splits the backends' time into logits GEMMs,
tile math, gradient GEMMs and the rest. ``--memory`` measures extra peak RSS of one step in a
fresh subprocess per case (inputs excluded; the step's gradients and one fp32 grad-weight
accumulator are reported separately and subtracted). Targets: <= 1.10 fp32, <= 1.30 bf16,
extra memory < 512 MB at N=16384, H=1024, V=152064 bf16.

    python bench/bench_cpu_floor.py                      # both shapes, fp32 + bf16, 3 repeats
    python bench/bench_cpu_floor.py --memory --big-memory
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

import opd_fast
from opd_fast.backends import chunked, cpu_native, tile_math
from opd_fast.benchmarking.shapes import SHAPE_FORMAT, Shape, parse_shape, shape_arg

SHAPES = [parse_shape("4096x1024x32768"), parse_shape("2048x1024/2048x131072")]
BIG = parse_shape("16384x1024x152064")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"fp32": 1.10, "bf16": 1.30}
MB = 2**20


def make_inputs(shape: Shape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    n, h_s, h_t, v = shape.n, shape.h_s, shape.h_t, shape.v
    g = torch.Generator().manual_seed(0)
    t = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dtype)
    return dict(student_hidden=t(n, h_s).requires_grad_(), student_weight=t(v, h_s, std=h_s**-0.5).requires_grad_(),
                teacher_hidden=t(n, h_t), teacher_weight=t(v, h_t, std=h_t**-0.5))


class Floor:
    """The four GEMMs at full size into preallocated outputs (no allocation in the timed call)."""

    def __init__(self, x: dict[str, torch.Tensor]) -> None:
        self.hs, self.ws = x["student_hidden"].detach(), x["student_weight"].detach()
        self.ht, self.wt = x["teacher_hidden"], x["teacher_weight"]
        n, v = self.hs.shape[0], self.ws.shape[0]
        self.s = torch.empty(n, v, dtype=self.hs.dtype)
        self.t = torch.empty(n, v, dtype=self.ht.dtype)
        self.gh, self.gw = torch.empty_like(self.hs), torch.empty_like(self.ws)

    def __call__(self) -> None:
        torch.mm(self.hs, self.ws.T, out=self.s)
        torch.mm(self.ht, self.wt.T, out=self.t)
        torch.mm(self.s, self.ws, out=self.gh)  # the logits stand in for their gradient
        torch.mm(self.s.T, self.hs, out=self.gw)


def loss_step(x: dict[str, torch.Tensor], backend: str):
    def step() -> None:
        x["student_hidden"].grad = x["student_weight"].grad = None
        opd_fast.fused_linear_kl(**x, backend=backend).backward()

    return step


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class PhaseTimer:
    """Wall time spent inside the chunk loop's GEMM / tile-math / gradient calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def patched(self):
        targets = [(chunked.Head, "logits", "logits GEMMs"), (chunked.GradSink, "add", "grad GEMMs + accumulate"),
                   (tile_math.TorchTileMath, "full_rows", "tile math"),
                   (cpu_native.NativeTileMath, "full_rows", "tile math")]
        saved = [(cls, name, getattr(cls, name)) for cls, name, _ in targets]
        for cls, name, label in targets:
            setattr(cls, name, self._wrap(getattr(cls, name), label))
        try:
            yield self
        finally:
            for cls, name, fn in saved:
                setattr(cls, name, fn)

    def _wrap(self, fn, label):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0

        return wrapper


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} [{min(values):.3f}-{max(values):.3f}]"


def bench_case(shape: Shape, dtype_name: str, backends: list[str], repeats: int, phases: bool) -> dict:
    x = make_inputs(shape, DTYPES[dtype_name])
    floor = Floor(x)
    steps = {"floor": floor, **{b: loss_step(x, b) for b in backends}}
    first = {b: timed(steps[b]) for b in backends}  # first call: includes any one-time cost
    floor()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats):
        order = list(steps)[r % len(steps):] + list(steps)[: r % len(steps)]  # rotate the interleaving
        for k in order:
            times[k].append(timed(steps[k]))
    ratios = {b: [t / f for t, f in zip(times[b], times["floor"], strict=True)] for b in backends}
    result = dict(case=shape.spec, dtype=dtype_name, times=times, ratios=ratios, first_call=first)
    print(f"\n== {shape.label} {dtype_name}  (threads={torch.get_num_threads()}, repeats={repeats})")
    print(f"  floor      {fmt(times['floor'])} s")
    for b in backends:
        ok = "ok" if statistics.median(ratios[b]) <= TARGETS[dtype_name] else "MISSED"
        print(f"  {b:<10} {fmt(times[b])} s   ratio {fmt(ratios[b])}  target {TARGETS[dtype_name]} {ok}"
              f"   first call {first[b]:.3f} s")
    if phases:
        result["phases"] = {}
        for b in backends:
            timer = PhaseTimer()
            with timer.patched():
                total = timed(steps[b])
            parts = dict(timer.seconds)
            parts["other"] = total - sum(parts.values())
            result["phases"][b] = parts
            print(f"  phases {b}: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + f" (total {total:.3f})")
    del floor
    return result


def memory_child(shape: Shape, dtype_name: str, backend: str) -> dict:
    """Runs in a fresh process: extra peak RSS of one forward+backward beyond the inputs."""
    from opd_fast.benchmarking.memory import PeakMeter

    x = make_inputs(shape, DTYPES[dtype_name])
    meter = PeakMeter(torch.device("cpu"))
    meter.start()
    loss_step(x, backend)()
    extra = meter.extra_bytes()
    h_s, v = shape.h_s, shape.v
    grads = x["student_hidden"].grad.nbytes + x["student_weight"].grad.nbytes
    accumulator = v * h_s * 4 if DTYPES[dtype_name] != torch.float32 else 0  # fp32 grads are the accumulator
    return dict(extra_mb=extra / MB, grads_mb=grads / MB, accumulator_mb=accumulator / MB,
                beyond_mb=(extra - grads - accumulator) / MB)


def memory_case(shape: Shape, dtype_name: str, backend: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", json.dumps([shape.spec, dtype_name, backend])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  memory {shape.spec} {dtype_name} {backend:<6}: peak RSS +{res['extra_mb']:.0f} MB = gradients "
          f"{res['grads_mb']:.0f} + fp32 accumulator {res['accumulator_mb']:.0f} + extra {res['beyond_mb']:.0f} MB")
    return dict(case=shape.spec, dtype=dtype_name, backend=backend, **res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", type=shape_arg, default=SHAPES, metavar="SHAPE",
                   help=f"shapes as {SHAPE_FORMAT} (default: {' '.join(s.spec for s in SHAPES)})")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--backends", nargs="+", default=["torch", "cpu"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phases", action="store_true", help="one extra run per backend split into phases")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--memory", action="store_true", help="extra peak RSS per case, fresh subprocess each")
    p.add_argument("--big-memory", action="store_true", help="extra peak RSS at N=16384, H=1024, V=152064 bf16")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        spec, dtype_name, backend = json.loads(args.memory_child)
        print(json.dumps(memory_child(parse_shape(spec), dtype_name, backend)))
        return
    results: dict[str, list] = {"speed": [], "memory": []}
    for shape in args.shapes:
        for dt in args.dtypes:
            if not args.no_speed:
                results["speed"].append(bench_case(shape, dt, args.backends, args.repeats, args.phases))
            if args.memory:
                results["memory"] += [memory_case(shape, dt, b) for b in args.backends]
    if args.big_memory:
        results["memory"].append(memory_case(BIG, "bf16", "cpu"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
