"""Extra time of hard labels (``fused_linear_kl(labels=..., hard_weight=...)``) on one backend.

    .venv/bin/python bench/bench_hard_labels.py [--shape 4096x1024x32768] [--rounds 3] [--dtypes fp32 bf16]
                                                [--backend cpu] [--temperature 1.0]

End to end: forward+backward of the plain loss and of the loss with labels (a quarter of them
``ignore_index``), interleaved rounds after a warm-up, median (min-max). The GEMMs dominate and
drift on a shared machine, so the element-wise part is also timed alone: ``full_rows`` of the
backend's tile math on one chunk-sized tile, with and without labels (median of ``--tile-reps``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import opd_fast
from opd_fast.backends import cpu_native
from opd_fast.backends.tile_math import HardLabels, TorchTileMath
from opd_fast.benchmarking.inputs import make_inputs
from opd_fast.benchmarking.shapes import SHAPE_FORMAT, shape_arg
from opd_fast.benchmarking.timing import interleaved
from opd_fast.core.call import HeadSpec, LossOptions
from opd_fast.core.tokens import NO_LABEL

SEED = 0


def labels_for(n: int, vocab: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(SEED))
    labels[::4] = -100
    return labels


def x_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def tile_times(dtype: torch.dtype, vocab: int, temperature: float, backend: str, rows: int, reps: int):
    """Median seconds of one ``full_rows`` call on a (rows, vocab) tile: (plain, with labels)."""
    math = cpu_native.NativeTileMath() if backend == "cpu" else TorchTileMath()
    g = torch.Generator().manual_seed(SEED)
    raw_s, raw_t = ((torch.randn(rows, vocab, generator=g) * 3).to(dtype) for _ in range(2))
    opts = LossOptions("forward_kl", 0.5, temperature, False, "mean", None, HeadSpec(), HeadSpec(), vocab)
    scale = torch.full((rows,), 1.0 / rows)
    labels = labels_for(rows, vocab).clamp_min(NO_LABEL)
    hard = HardLabels(labels, torch.where(labels >= 0, 0.5 / rows, 0.0))
    runs: dict[str, list[float]] = {"plain": [], "labels": []}
    for _ in range(reps + 1):  # the first round warms up
        for name, h in (("plain", None), ("labels", hard)):
            s = raw_s.clone()  # the native kernel writes the gradient over the student tile
            t0 = time.perf_counter()
            math.full_rows(s, raw_t, opts, scale, h)
            runs[name].append(time.perf_counter() - t0)
    return statistics.median(runs["plain"][1:]), statistics.median(runs["labels"][1:])


def loss_step(backend: str, temperature: float, labels: torch.Tensor | None):
    kw = {} if labels is None else dict(labels=labels, hard_weight=0.5)
    return lambda x: opd_fast.fused_linear_kl(
        x.hs, x.ws, x.ht, x.wt, temperature=temperature, backend=backend, **kw
    ).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x1024x32768", type=shape_arg,
                        help=f"{SHAPE_FORMAT} (default: %(default)s)")
    parser.add_argument("--rounds", default=3, type=int)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--backend", default="cpu", choices=["cpu", "torch"])
    parser.add_argument("--temperature", default=1.0, type=float)
    parser.add_argument("--tile-rows", default=512, type=int)
    parser.add_argument("--tile-reps", default=15, type=int)
    args = parser.parse_args()
    shape, b, temp = args.shape, args.backend, args.temperature
    print(f"{shape.label}, forward_kl, T={temp}, backend={b}, forward+backward; {args.rounds} rounds after a warm-up, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| dtype | plain s | with labels s | extra | tile {args.tile_rows}xV plain ms | with labels ms | extra |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        x = make_inputs(shape, dtype, SEED)
        steps = {"plain": loss_step(b, temp, None), "labels": loss_step(b, temp, labels_for(shape.n, shape.v))}
        interleaved(steps, x, 1)
        t = interleaved(steps, x, args.rounds)
        del x
        p, h = t["plain"], t["labels"]
        tp, th = tile_times(x_dtype(dtype), shape.v, temp, b, args.tile_rows, args.tile_reps)
        print(f"| {dtype} | {p.median:.2f} ({p.min:.2f}-{p.max:.2f}) | {h.median:.2f} ({h.min:.2f}-{h.max:.2f}) | "
              f"{h.median / p.median - 1:+.1%} | {tp * 1e3:.1f} | {th * 1e3:.1f} | {th / tp - 1:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
