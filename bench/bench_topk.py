"""Top-k teacher loss and per-token log-probs vs the full-logits loss: forward+backward time and extra peak memory.

    .venv/bin/python bench/bench_topk.py [--shape 4096x1024x32768] [--k 64] [--rounds 5] [--dtypes fp32 bf16]
                                         [--backends cpu torch]

Same student operands for every loss (``opd_fast.benchmarking.inputs``); the top-k teacher is
the top ``k`` log-probs of the correlated teacher head those inputs carry, computed once, untimed.
Each loss runs on every backend of ``--backends`` (the ratio column divides by the full-logits
loss on the first one); ``logprobs`` is ``fused_linear_logprobs`` of the teacher's top-1 ids.
Times: interleaved rounds after a warm-up round, median (min-max). Memory: extra peak RSS of one
step in a fresh process (``opd_fast.benchmarking.memory``), inputs and teacher top-k excluded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable

import torch

import opd_fast
from opd_fast.benchmarking.inputs import BenchInputs, make_inputs
from opd_fast.benchmarking.memory import MB, PeakMeter
from opd_fast.benchmarking.shapes import SHAPE_FORMAT, Shape, shape_arg
from opd_fast.benchmarking.timing import interleaved

SEED = 0


def teacher_topk(x: BenchInputs, k: int, rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher head's top-k (ids, fp32 log-probs), ``rows`` tokens at a time."""
    ids, log_p = [], []
    with torch.no_grad():
        for i0 in range(0, x.ht.shape[0], rows):
            logits = (x.ht[i0 : i0 + rows] @ x.wt.T).float()
            values, index = torch.log_softmax(logits, -1).topk(k, -1)
            ids.append(index)
            log_p.append(values)
    return torch.cat(ids), torch.cat(log_p)


def steps(
    ids: torch.Tensor, log_p: torch.Tensor, backends: list[str]
) -> dict[str, Callable[[BenchInputs], None]]:
    """Forward + backward of each compared loss (forward KL, mean reduction) on each backend."""

    def full(b: str) -> Callable[[BenchInputs], None]:
        return lambda x: opd_fast.fused_linear_kl(x.hs, x.ws, x.ht, x.wt, backend=b).backward()

    def topk(tail: str, b: str, stats: bool = False) -> Callable[[BenchInputs], None]:
        def step(x: BenchInputs) -> None:
            out = opd_fast.fused_linear_kl_topk(x.hs, x.ws, ids, log_p, tail=tail, backend=b, return_stats=stats)
            (out[0] if stats else out).backward()

        return step

    def logprobs(b: str) -> Callable[[BenchInputs], None]:
        return lambda x: opd_fast.fused_linear_logprobs(x.hs, x.ws, ids[:, 0], backend=b).sum().backward()

    out = {f"full_kl[{backends[0]}]": full(backends[0])}
    out.update({f"topk[bucket][{b}]": topk("bucket", b) for b in backends})
    # renormalize needs only the k id logits (the k-sparse path, the same on every backend); asking for the
    # stats (full log-sum-exp, entropy) makes it sweep the vocabulary like the bucket
    out["topk[renormalize][k-sparse]"] = topk("renormalize", backends[0])
    out.update({f"topk[renormalize+stats][{b}]": topk("renormalize", b, stats=True) for b in backends})
    out.update({f"logprobs[{b}]": logprobs(b) for b in backends})
    return out


def _setup(
    shape: Shape, dtype: str, k: int, backends: list[str]
) -> tuple[BenchInputs, dict[str, Callable[[BenchInputs], None]]]:
    x = make_inputs(shape, dtype, SEED)
    return x, steps(*teacher_topk(x, k), backends)


def memory_worker(shape: Shape, dtype: str, k: int, name: str, backends: list[str]) -> None:
    """Runs in a fresh process: extra peak RSS of one step of ``name``, printed as JSON."""
    x, step = _setup(shape, dtype, k, backends)
    meter = PeakMeter(x.hs.device)
    meter.start()
    step[name](x)
    print(json.dumps({"peak_extra_mb": meter.extra_bytes() / MB}))


def peak_extra_mb(shape: Shape, dtype: str, k: int, name: str, backends: list[str]) -> float:
    cmd = [sys.executable, __file__, "--worker", name, "--shape", shape.spec,
           "--k", str(k), "--dtypes", dtype, "--backends", *backends]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x1024x32768", type=shape_arg,
                        help=f"{SHAPE_FORMAT} (default: %(default)s)")
    parser.add_argument("--k", default=64, type=int)
    parser.add_argument("--rounds", default=5, type=int)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--backends", nargs="+", default=["cpu", "torch"], choices=["cpu", "torch", "triton"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        memory_worker(args.shape, args.dtypes[0], args.k, args.worker, args.backends)
        return
    print(f"{args.shape.label} k={args.k}, forward_kl, forward+backward; {args.rounds} rounds after a warm-up, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| dtype | loss | median s (min-max) | vs full_kl | extra peak MB |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes:
        x, step = _setup(args.shape, dtype, args.k, args.backends)
        interleaved(step, x, 1)  # warm-up
        times = interleaved(step, x, args.rounds)
        del x
        base = times[f"full_kl[{args.backends[0]}]"].median
        for name, t in times.items():
            mb = peak_extra_mb(args.shape, dtype, args.k, name, args.backends)
            print(f"| {dtype} | {name} | {t.median:.2f} ({t.min:.2f}-{t.max:.2f}) | {t.median / base:.2f} | {mb:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
