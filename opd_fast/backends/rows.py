"""The full-row sweep: token chunks of whole vocabulary rows for single-head losses.

``backends.chunked`` pairs a student and a teacher head; the per-token log-probs and the
top-k teacher loss need only the student head, but whole (compared) vocabulary rows at
once. This is that loop: ``chunked``'s GEMM tile (``Head``), chunk plan and gradient
accumulators (``GradSink``) and ``tile_math``'s logit finishing, with the per-tile math
swapped for a ``RowKernel`` (torch: ``row_math``; native: ``cpu_rows``). ``RowsEngine`` is the
loop as an ``Engine``; it keeps no state between calls (a gradient call recomputes the tiles).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from ..core.call import HeadSpec, LossOptions, Tuning
from ..core.engine import EngineResult, Student, StudentGrads, Upstream, Want, accum_dtype
from .chunked import GradSink, Head, plan_chunks
from .tile_math import finish_logits, logits_grad_to_raw

__all__ = ["RowKernel", "RowSetup", "RowsEngine", "sweep_rows"]

# fp32 chunk x V tiles alive at once in the row kernels (final logits, gradient, a temporary of
# the reductions, and log q / q for the entropy), besides the GEMM's scratch buffer.
_LIVE_TILES = 4


class RowKernel(Protocol):
    """Per-row math on one chunk of final student logits ``z`` (fp32/fp64, ``(n, V)``).

    Returns the chunk's per-row outputs and, when ``upstream`` (the incoming gradient of each of
    the first ``n_differentiable`` outputs, ``(n,)`` or None) is given, ``dL/dz`` as a new tile.
    ``z`` may be used as scratch but must hold its values again on return (softcap's derivative
    is read back from it).

    A kernel with ``takes_raw_logits = True`` (the native ones, ``cpu_rows``) gets the raw GEMM
    tile instead and returns ``dL/d(raw)``: softcap, temperature and their chain rule are its own;
    it then also says how many bytes per logit it keeps alive (``live_bytes_per_logit(dtype)``, None
    for the torch kernels' figure).
    """

    output_names: tuple[str, ...]
    n_differentiable: int

    def __call__(
        self, z: torch.Tensor, rows: slice, upstream: Upstream | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]: ...


@dataclass(frozen=True)
class RowSetup:
    """How the student's final logits are formed (``softcap(scale (h W^T + b)) / T``) and chunked."""

    spec: HeadSpec
    temperature: float
    vocab: int
    tuning: Tuning

    @classmethod
    def of(cls, opts: LossOptions, tuning: Tuning) -> RowSetup:
        return cls(opts.student, opts.temperature, opts.vocab_size, tuning)


def sweep_rows(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    kernel: RowKernel,
    setup: RowSetup,
    upstream: Upstream | None = None,
    sink: GradSink | None = None,
) -> list[torch.Tensor]:
    """Run ``kernel`` over token chunks of full vocab rows; accumulate its gradient into ``sink``.

    Peak extra memory is a few ``chunk x V`` fp32 tiles, ``chunk`` chosen by ``plan_chunks``
    within ``tuning.memory_budget_mb`` (the vocabulary is never tiled here).
    """
    n, vocab = hs.shape[0], setup.vocab
    raw = getattr(kernel, "takes_raw_logits", False)
    live_bytes = kernel.live_bytes_per_logit(hs.dtype) if raw else None
    if live_bytes is None:
        live_bytes = _LIVE_TILES * accum_dtype(hs.dtype).itemsize + hs.dtype.itemsize
    chunk, _ = plan_chunks(n, vocab, replace(setup.tuning, chunk_vocab=vocab), live_bytes)
    head = Head(ws, bs, setup.spec.scale)
    buffer = torch.empty(chunk * vocab, dtype=hs.dtype, device=hs.device)
    if upstream is not None and head.scale != 1.0:
        upstream = [None if u is None else u * head.scale for u in upstream]  # the sink takes dL/d(h W^T + b)
    outs = [torch.zeros(n, dtype=accum_dtype(hs.dtype), device=hs.device) for _ in kernel.output_names]
    for i0 in range(0, n, chunk):
        rows = slice(i0, min(i0 + chunk, n))
        h = hs[rows]
        z = head.logits(h, 0, vocab, buffer)
        if not raw:
            z = finish_logits(z, setup.spec, setup.temperature)
        chunk_up = None if upstream is None else [None if u is None else u[rows] for u in upstream]
        values, grad = kernel(z, rows, chunk_up)
        for out, value in zip(outs, values, strict=True):
            out[rows] = value
        if grad is not None and sink is not None:
            sink.add(grad if raw else logits_grad_to_raw(grad, z, setup.spec, setup.temperature), h, rows, 0)
    return outs


class RowsEngine:
    """``sweep_rows`` with a ``RowKernel`` as an ``Engine`` (its outputs are the kernel's)."""

    def __init__(self, kernel: RowKernel, setup: RowSetup) -> None:
        self.kernel, self.setup = kernel, setup
        self.output_names, self.n_differentiable = kernel.output_names, kernel.n_differentiable

    def run(self, student: Student, upstream: Upstream | None, want: Want, state: None = None) -> EngineResult:
        hs, ws, bs = student
        sink = None
        if upstream is not None:
            sink = GradSink(hs, Head(ws, bs, self.setup.spec.scale), want, self.setup.tuning)
        outs = sweep_rows(hs, ws, bs, self.kernel, self.setup, upstream, sink)
        grads = None if sink is None else StudentGrads(sink.grad_h, sink.grad_w, sink.grad_b)
        return EngineResult(tuple(outs), grads)
