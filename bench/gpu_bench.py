"""One-call GPU benchmark of the Triton backend: correctness first, then time and memory against the floor and peers.

Made for one short command on one GPU (the target: an H200 with torch 2.11 and triton 3.6, no
network), so it degrades gracefully instead of running out of time: stages run in order of
value, every result is written to the JSON file as soon as it exists, and a stage or case that
would start after ``--budget-s`` (the correctness stage: after its ``--correctness-share`` of it)
is recorded as skipped instead of run. Each new kernel specialization compiles on first use
(seconds each on a fresh machine), which is most of the correctness stage's time.

1. ``environment``: versions, the GPU, which peers import.
2. ``correctness``: every divergence x dtype x feature (temperature / scale / softcap / biases,
   masks and weights, hard labels, ``vocab_size``, ``teacher_lse``, narrow gradient stripes,
   ``reduction="none"``, the cached mode) and the top-k / log-prob losses through the public functions on the
   Triton backend, against the float64 reference at a small shape; then the first 128 rows of
   the largest timing shape against float64 (the kernels' big-shape tiles and stripes).
3. ``timing``: forward + backward time (median of ``--repeats`` after one untimed call) and extra
   peak memory of the first call, per shape, for the bare-GEMM floor, opd-fast (strict and cached
   modes, forward KL, JSD, forward KL with ``teacher_lse``), naive torch, Liger's chunked JSD (eager; ``torch.compile``d
   when time allows) and TRL's ``chunked_divergence`` when importable.

Liger-Kernel is pure Python: bring it as a wheel, since the GPU machine has no network::

    pip download liger-kernel --no-deps -d bench/wheels/      # bench/wheels/ is git-ignored

The wheel is unpacked into a temporary directory and put on ``sys.path`` (``--wheels``).

    python bench/gpu_bench.py --budget-s 420 --out bench/results/gpu_h200.json

CI dry-runs it on CPU under ``TRITON_INTERPRET=1`` with ``--toy`` (tiny shapes, fp32 / fp16), so
it cannot rot; its numbers there mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

import opd_fast
from opd_fast import Tuning, reference
from opd_fast.benchmarking.floor import gemm_floor_step
from opd_fast.benchmarking.inputs import BenchInputs, make_inputs
from opd_fast.benchmarking.peers import liger_loss, naive_loss
from opd_fast.benchmarking.shapes import DTYPES, Shape

DIVERGENCES = (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("tvd", 0.5))
# Liger's published shape (its chunked distillation JSD: 60.7 ms / 11.1 GB on H100), then two smaller ones.
TIMING_SHAPES = (Shape(8192, 128256, 2048, 4096), Shape(4096, 128256, 2048, 4096), Shape(2048, 32768, 1024, 1024))
CHECK_SHAPE = Shape(256, 4099, 192, 320)  # odd vocabulary: partial tiles and stripes
TOY_TIMING_SHAPES = (Shape(24, 96, 16, 32),)
TOY_CHECK_SHAPE = Shape(13, 70, 24, 48)
BIG_CHECK_ROWS = 128
# Relative (Frobenius) error allowed against float64, as `opd-fast bench` allows (bf16 gradients round at ~4e-3).
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


# ---- results ------------------------------------------------------------------------------------


@dataclass
class Results:
    """Everything measured so far; ``save`` rewrites the JSON file atomically after every entry."""

    path: Path
    deadline: float
    data: dict[str, Any] = field(default_factory=lambda: {"stages": {}, "skipped": []})
    stage_deadline: float = math.inf  # the running stage's own share of the budget

    def left(self) -> float:
        return min(self.deadline, self.stage_deadline) - time.monotonic()

    def add(self, stage: str, entry: dict[str, Any]) -> None:
        self.data["stages"].setdefault(stage, []).append(entry)
        self.save()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error over the finite entries (inf where finiteness differs)."""
    got, want = got.detach().double(), want.detach().double()
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return math.inf
    ok = torch.isfinite(want)
    return float((got[ok] - want[ok]).norm() / want[ok].norm().clamp_min(1e-30))


# ---- stage 1: environment ------------------------------------------------------------------------


def unpack_wheels(folder: Path) -> list[str]:
    """Unpack every wheel in ``folder`` into a temporary directory on ``sys.path``; their names."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if wheels:
        target = tempfile.mkdtemp(prefix="opd_fast_wheels_")
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
        sys.path.insert(0, target)
    return [w.name for w in wheels]


def _importable(module: str) -> str | None:
    """None when ``module`` imports, else why not."""
    try:
        __import__(module)
    except Exception as exc:  # a peer's import can fail in many ways (missing deps, version checks)
        return f"{type(exc).__name__}: {exc}"
    return None


PEER_MODULES = {"liger": "liger_kernel.chunked_loss", "trl_chunked": "trl.kernels.chunked_divergence"}


def environment(device: torch.device, wheels: list[str], peers: list[str]) -> dict[str, Any]:
    import triton

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "opd_fast": getattr(opd_fast, "__version__", "dev"), "device": str(device), "wheels": wheels,
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "peers": {name: _importable(PEER_MODULES[name]) or "ok" for name in peers},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30, 1))
    return info


# ---- stage 2: correctness ----------------------------------------------------------------------


def _features(shape: Shape, device: torch.device, gen: torch.Generator) -> dict[str, dict[str, Any]]:
    """Keyword arguments of ``fused_linear_kl`` per feature (``teacher_lse`` is filled in per case)."""
    n, v = shape.n, shape.v
    mask = torch.rand(n, generator=gen, device=device) > 0.3
    labels = torch.randint(0, v, (n,), generator=gen, device=device)
    labels[::5] = -100
    return {
        "plain": {},
        "heads_T_scale_softcap": dict(temperature=1.7, student_logit_scale=0.8, student_softcap=20.0,
                                      teacher_logit_scale=1.1, teacher_softcap=25.0),
        "bias": dict(bias=True),
        "mask_weights": dict(mask=mask, token_weights=torch.rand(n, generator=gen, device=device) + 0.1),
        "hard_labels_T": dict(labels=labels, hard_weight=0.5, temperature=1.5),
        "vocab_size": dict(vocab_size=v - 37),
        "teacher_lse": dict(teacher_lse=True, mask=mask),
        "narrow_stripes": dict(tuning=Tuning(chunk_vocab=512)),
        "cached_mode": dict(tuning=Tuning(triton_mode="cached", chunk_tokens=64)),
        "cached_mode_labels_softcap": dict(labels=labels, hard_weight=0.5, temperature=1.5, student_softcap=20.0,
                                           tuning=Tuning(triton_mode="cached", chunk_tokens=64)),
        "reduction_none": dict(reduction="none"),
    }


def _head_tensors(shape: Shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator, bias: bool):
    """Student leaves and teacher constants with logits of a few nats' spread (not one-hot, not flat)."""
    def rand(*size: int, scale: float) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

    s = dict(student_hidden=rand(shape.n, shape.h_s, scale=1.0).requires_grad_(),
             student_weight=rand(shape.v, shape.h_s, scale=3.0 / math.sqrt(shape.h_s)).requires_grad_())
    t = dict(teacher_hidden=rand(shape.n, shape.h_t, scale=1.0),
             teacher_weight=rand(shape.v, shape.h_t, scale=3.0 / math.sqrt(shape.h_t)))
    if bias:
        s["student_bias"] = rand(shape.v, scale=0.5).requires_grad_()
        t["teacher_bias"] = rand(shape.v, scale=0.5)
    return s, t


def _kl_errors(student: dict, teacher: dict, kwargs: dict[str, Any]) -> dict[str, float]:
    """Relative errors of the Triton call's loss, gradients and stats against float64."""
    leaves = list(student.values())
    args = (student["student_hidden"], student["student_weight"], teacher["teacher_hidden"], teacher["teacher_weight"])
    extra = {k: v for k, v in {**student, **teacher}.items() if k.endswith("_bias")}
    pass_lse = kwargs.pop("teacher_lse", False)
    ref, ref_stats = reference.fused_linear_kl(*args, **extra, **kwargs, return_stats=True)
    if pass_lse:  # the true LSE, as return_stats gives it: the result must not change
        kwargs["teacher_lse"] = ref_stats["teacher_lse"].float()
    out, stats = opd_fast.fused_linear_kl(*args, **extra, **kwargs, backend="triton", return_stats=True)
    weight = torch.rand(ref.shape, generator=torch.Generator(ref.device).manual_seed(1), device=ref.device) + 0.5
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), leaves)
    errors = {"loss": _rel(out, ref)}
    errors.update({f"grad_{k.removeprefix('student_')}": _rel(g, r)
                   for k, g, r in zip(student, grads, ref_grads, strict=True)})
    errors.update({f"stat_{k}": _rel(stats[k], v) for k, v in ref_stats.items() if k in stats})
    return errors


SINGLE_HEAD_LOSSES = ("topk_bucket", "logprobs_entropy")


def _single_head_errors(loss: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """The top-k (bucket, reverse KL) or log-prob (with entropy) loss, value and gradients, against float64."""
    gen = torch.Generator(device).manual_seed(zlib.crc32(loss.encode()))
    student, _ = _head_tensors(shape, dtype, device, gen, bias=False)
    hs, ws = student["student_hidden"], student["student_weight"]
    k = 8
    log_p, ids = torch.log_softmax(torch.randn(shape.n, shape.v, generator=gen, device=device) * 2, -1).topk(k, -1)
    tokens = torch.randint(0, shape.v, (shape.n,), generator=gen, device=device)
    calls = {
        "topk_bucket": lambda backend: opd_fast.fused_linear_kl_topk(hs, ws, ids, log_p.to(dtype), tail="bucket",
                                                                     divergence="reverse_kl", backend=backend),
        "logprobs_entropy": lambda backend: sum(t.sum() for t in opd_fast.fused_linear_logprobs(
            hs, ws, tokens, return_entropy=True, backend=backend)),
    }
    got, want = calls[loss]("triton"), calls[loss]("reference")
    grads, ref_grads = torch.autograd.grad(got, [hs, ws]), torch.autograd.grad(want, [hs, ws])
    return {"loss": _rel(got, want), "grad_hidden": _rel(grads[0], ref_grads[0]),
            "grad_weight": _rel(grads[1], ref_grads[1])}


def correctness(results: Results, check_shape: Shape, big_shape: Shape, dtypes: list[str],
                divergences: list[str], features: list[str] | None, device: torch.device) -> None:
    """Every divergence x dtype x feature at ``check_shape``; then 128 rows of ``big_shape``; all vs float64."""
    betas = dict(DIVERGENCES)
    for dtype_name in dtypes:
        dtype, tol = DTYPES[dtype_name], TOLERANCE[dtype_name]
        for divergence in divergences:
            beta = betas[divergence]
            for feature, options in _features(check_shape, device, torch.Generator(device).manual_seed(0)).items():
                if features is not None and feature not in features:
                    continue
                if results.left() <= 0:
                    results.skip(f"correctness {dtype_name} {divergence} {feature}", "time budget")
                    continue
                gen = torch.Generator(device).manual_seed(zlib.crc32(f"{dtype_name}/{divergence}/{feature}".encode()))
                options = dict(options)
                student, teacher = _head_tensors(check_shape, dtype, device, gen, bias=options.pop("bias", False))
                entry = {"shape": asdict(check_shape), "dtype": dtype_name, "divergence": divergence,
                         "feature": feature}
                kwargs = dict(options, divergence=divergence, beta=beta)
                results.add("correctness", {**entry, **_judged(partial(_kl_errors, student, teacher, kwargs), tol)})
        for loss in SINGLE_HEAD_LOSSES:
            if results.left() <= 0:
                results.skip(f"correctness {dtype_name} {loss}", "time budget")
                continue
            results.add("correctness", {"shape": asdict(check_shape), "dtype": dtype_name, "loss": loss,
                                        **_judged(partial(_single_head_errors, loss, check_shape, dtype, device), tol)})
    rows = Shape(min(BIG_CHECK_ROWS, big_shape.n), big_shape.v, big_shape.h_s, big_shape.h_t)
    for divergence in divergences:
        beta = betas[divergence]
        if results.left() <= 0:
            results.skip(f"correctness big-shape {divergence}", "time budget")
            continue
        dtype_name = dtypes[0]
        gen = torch.Generator(device).manual_seed(2)
        student, teacher = _head_tensors(rows, DTYPES[dtype_name], device, gen, bias=False)
        results.add("correctness_big_shape", {
            "shape": asdict(big_shape), "rows": rows.n, "dtype": dtype_name, "divergence": divergence,
            **_judged(partial(_kl_errors, student, teacher, dict(divergence=divergence, beta=beta)),
                      TOLERANCE[dtype_name])})


def _judged(fn: Callable[[], dict[str, float]], tol: float) -> dict[str, Any]:
    """``fn``'s errors with a verdict (every error within ``tol``), or the exception it raised."""
    try:
        errors = fn()
    except Exception:  # recorded, never fatal: the next checks and stages still run
        return {"ok": False, "error": traceback.format_exc(limit=4)}
    return {"ok": all(e <= tol for e in errors.values()), "tolerance": tol, "errors": errors}


# ---- stage 3: timing -----------------------------------------------------------------------------


Step = Callable[[BenchInputs], None]


def _loss_step(loss: Callable[[BenchInputs], torch.Tensor]) -> Step:
    def step(x: BenchInputs) -> None:
        x.clear_grads()
        loss(x).backward()

    return step


# The cached mode's budget for the timed shapes: token chunks of 2080 rows at V = 128256 (two fp16 tile-shifted
# logit caches, the bf16 gradient written over the student's: 4 bytes per logit), ~2.1 GB extra with grad-weight.
CACHED = Tuning(triton_mode="cached", memory_budget_mb=1024)


def _opd_fast(divergence: str, teacher_lse: torch.Tensor | None = None, tuning: Tuning | None = None) -> Step:
    return _loss_step(lambda x: opd_fast.fused_linear_kl(x.hs, x.ws, x.ht, x.wt, divergence=divergence,
                                                         teacher_lse=teacher_lse, backend="triton", tuning=tuning))


def _peer(make: Callable[[], Callable]) -> Step:
    loss = make()
    return _loss_step(lambda x: loss(x.hs, x.ws, x.ht, x.wt))


def _trl_chunked(beta: float) -> Step:
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    return _loss_step(lambda x: ChunkedDivergenceFunction.apply(x.hs, x.ws, None, x.ht, x.wt, None, beta)[0].mean())


def implementations(x: BenchInputs, peers: dict[str, str]) -> dict[str, Callable[[], Step]]:
    """Name -> builder of a forward+backward step, in the order they are timed (most informative first)."""
    def teacher_lse() -> torch.Tensor:
        with torch.no_grad():
            _, stats = opd_fast.fused_linear_kl(x.hs, x.ws, x.ht, x.wt, backend="triton", return_stats=True)
        return stats["teacher_lse"]

    impls: dict[str, Callable[[], Step]] = {
        "gemm_floor": lambda: gemm_floor_step,
        "opd_fast[forward_kl]": lambda: _opd_fast("forward_kl"),
        "opd_fast[forward_kl,cached]": lambda: _opd_fast("forward_kl", tuning=CACHED),
        "opd_fast[jsd]": lambda: _opd_fast("jsd"),
        "opd_fast[jsd,cached]": lambda: _opd_fast("jsd", tuning=CACHED),
        "opd_fast[forward_kl,teacher_lse]": lambda: _opd_fast("forward_kl", teacher_lse()),
        "opd_fast[reverse_kl]": lambda: _opd_fast("reverse_kl"),
        "naive_torch[forward_kl]": lambda: _peer(lambda: naive_loss("forward_kl", 0.5)),
    }
    if peers.get("liger") == "ok":
        impls["liger[jsd]"] = lambda: _peer(lambda: liger_loss("jsd", 0.5, compiled=False))
    if peers.get("trl_chunked") == "ok":
        impls["trl_chunked[jsd]"] = lambda: _trl_chunked(0.5)
    if peers.get("liger") == "ok":  # last: its compile is the most expensive first call
        impls["liger_compiled[jsd]"] = lambda: _peer(lambda: liger_loss("jsd", 0.5, compiled=True))
    return impls


def measure(step: Step, x: BenchInputs, repeats: int, results: Results) -> dict[str, Any]:
    """First call (time and extra peak memory), then up to ``repeats`` timed calls within the budget."""
    device = x.hs.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    step(x)
    _sync(device)
    first = time.perf_counter() - t0
    out: dict[str, Any] = {"first_call_s": first}
    if device.type == "cuda":
        out["extra_peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times = []
    for _ in range(repeats):
        if results.left() < 2 * (times[-1] if times else first):
            break
        t0 = time.perf_counter()
        step(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    if times:
        times.sort()
        out.update(median_ms=1e3 * times[len(times) // 2], min_ms=1e3 * times[0], rounds=len(times))
    return out


def timing(results: Results, shapes: tuple[Shape, ...], dtype_name: str, repeats: int, device: torch.device,
           peers: dict[str, str], skip: set[str]) -> None:
    for shape in shapes:
        if results.left() <= 0:
            results.skip(f"timing {shape.label}", "time budget")
            continue
        x = make_inputs(shape, dtype_name, seed=0, device=device)
        floor_ms = None
        for name, build in implementations(x, peers).items():
            entry = {"shape": asdict(shape), "dtype": dtype_name, "implementation": name}
            if name in skip:
                continue
            if results.left() <= 0:
                results.skip(f"timing {shape.label} {name}", "time budget")
                continue
            try:
                m = measure(build(), x, repeats, results)
            except torch.cuda.OutOfMemoryError:
                m = {"status": "oom"}
            except Exception:
                m = {"status": "error", "error": traceback.format_exc(limit=4)}
            finally:
                x.clear_grads()
            if name == "gemm_floor":
                floor_ms = m.get("median_ms")
            if floor_ms and m.get("median_ms"):
                m["x_floor"] = m["median_ms"] / floor_ms
            results.add("timing", {**entry, "status": "ok", **m})
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_bench.json"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new work after this many s")
    parser.add_argument("--correctness-share", type=float, default=0.5,
                        help="share of the budget the correctness stage may use (the rest is the timing's)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="correctness dtypes (timing uses the first)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stages", default="correctness,timing", help="subset of correctness,timing")
    parser.add_argument("--divergences", default=",".join(d for d, _ in DIVERGENCES))
    parser.add_argument("--features", default=None, help="correctness features to run (default: all)")
    parser.add_argument("--peers", default=",".join(PEER_MODULES), help="peers to time, if they import")
    parser.add_argument("--skip", default="", help="implementations not to time, e.g. 'liger_compiled[jsd]'")
    parser.add_argument("--wheels", type=Path, default=Path(__file__).parent / "wheels")
    parser.add_argument("--toy", action="store_true", help="tiny shapes on CPU (the interpreter dry run)")
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in TOLERANCE]
    if bad:
        parser.error(f"--dtypes must be a comma-separated subset of {sorted(TOLERANCE)}, got {bad}")
    stages = set(args.stages.split(","))
    peers = [p for p in args.peers.split(",") if p]
    if not set(peers) <= PEER_MODULES.keys():
        parser.error(f"--peers must be a comma-separated subset of {sorted(PEER_MODULES)}, got {args.peers!r}")
    divergences = [d for d in args.divergences.split(",") if d]
    if not set(divergences) <= dict(DIVERGENCES).keys():
        parser.error(f"--divergences must be a comma-separated subset of {[d for d, _ in DIVERGENCES]}")
    device = torch.device("cpu" if args.toy or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("no CUDA device: run with TRITON_INTERPRET=1 and --toy for a dry run on CPU")
    results = Results(args.out, time.monotonic() + args.budget_s)
    wheels = unpack_wheels(args.wheels)
    env = environment(device, wheels, peers)
    results.data.update(environment=env, arguments={k: str(v) for k, v in vars(args).items()})
    results.save()
    timing_shapes = TOY_TIMING_SHAPES if args.toy else TIMING_SHAPES
    if "correctness" in stages:
        check = TOY_CHECK_SHAPE if args.toy else CHECK_SHAPE
        features = None if args.features is None else args.features.split(",")
        results.stage_deadline = time.monotonic() + args.correctness_share * args.budget_s
        correctness(results, check, timing_shapes[0], dtypes, divergences, features, device)
        results.stage_deadline = math.inf
    if "timing" in stages:
        timing(results, timing_shapes, dtypes[0], args.repeats, device, env["peers"], set(args.skip.split(",")))
    checks = [e for stage in ("correctness", "correctness_big_shape") for e in results.data["stages"].get(stage, [])]
    failed = [e for e in checks if not e.get("ok")]
    results.data["summary"] = {"checks": len(checks), "failed": len(failed), "skipped": len(results.data["skipped"])}
    results.save()
    print(json.dumps(results.data["summary"]), f"-> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
