"""The full-row sweep: token chunks of whole vocabulary rows for single-head losses.

``backends.chunked`` pairs a student and a teacher head; the per-token log-probs and the
top-k teacher loss need only the student head, but whole (compared) vocabulary rows at
once. This is that loop: ``chunked``'s GEMM tile (``Head``), chunk plan and gradient
accumulators (``GradSink``) and ``tile_math``'s logit finishing, with the per-tile math
swapped for a ``RowKernel``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from ..validation import HeadSpec
from .chunked import GradSink, Head, Tuning, plan_chunks
from .tile_math import accum_dtype, finish_logits, logits_grad_to_raw

__all__ = ["FusedRows", "RowKernel", "RowSetup", "Upstream", "sweep_rows"]

Upstream = Sequence[torch.Tensor | None]

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

    n_outputs: int
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
    outs = [torch.zeros(n, dtype=accum_dtype(hs.dtype), device=hs.device) for _ in range(kernel.n_outputs)]
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


class FusedRows(torch.autograd.Function):
    """Autograd glue of ``sweep_rows`` for the student's hidden states, weight and bias.

    ``row_weights`` given: the loss is the scalar ``sum_i row_weights_i * out0_i``; its gradients
    are accumulated during the forward sweep and only scaled in backward. Returns
    ``(value, *outputs)``, outputs detached.
    ``row_weights=None``: returns the per-row ``outputs``, the first ``kernel.n_differentiable``
    differentiable; backward recomputes the logits with the incoming per-row gradients.
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, kernel: RowKernel, setup: RowSetup, row_weights):
        want = tuple(ctx.needs_input_grad[:3])
        ctx.set_materialize_grads(False)
        ctx.meta = (kernel, setup, want, row_weights is not None)
        ctx.dtypes = (ws.dtype, None if bs is None else bs.dtype)
        with torch.no_grad():
            if row_weights is None:
                outs = sweep_rows(hs, ws, bs, kernel, setup)
                ctx.save_for_backward(hs, ws, bs)
                ctx.mark_non_differentiable(*outs[kernel.n_differentiable :])
                return tuple(outs)
            sink = GradSink(hs, Head(ws, bs, setup.spec.scale), want, setup.tuning) if any(want) else None
            upstream = [row_weights] + [None] * (kernel.n_differentiable - 1)
            outs = sweep_rows(hs, ws, bs, kernel, setup, upstream if sink else None, sink)
            ctx.save_for_backward(*((None,) * 3 if sink is None else (sink.grad_h, sink.grad_w, sink.grad_b)))
            ctx.mark_non_differentiable(*outs)
            return ((outs[0] * row_weights).sum(), *outs)

    @staticmethod
    def backward(ctx, *grads):
        kernel, setup, want, scalar = ctx.meta
        none = (None, None, None)
        if scalar:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            g = grads[0]
            if g is None:
                return (*none, None, None, None)
            if bool(g != 1):  # a plain loss.backward() passes 1: skip three full-size passes
                grad_h = None if grad_h is None else grad_h * g.to(grad_h.dtype)
                grad_w = None if grad_w is None else grad_w * g
                grad_b = None if grad_b is None else grad_b * g
        else:
            hs, ws, bs = ctx.saved_tensors
            acc = accum_dtype(hs.dtype)
            upstream = [None if g is None else g.to(acc) for g in grads[: kernel.n_differentiable]]
            if all(u is None for u in upstream):
                return (*none, None, None, None)
            sink = GradSink(hs, Head(ws, bs, setup.spec.scale), want, setup.tuning)
            with torch.no_grad():
                sweep_rows(hs, ws, bs, kernel, setup, upstream, sink)
            grad_h, grad_w, grad_b = sink.grad_h, sink.grad_w, sink.grad_b
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight_dtype),
            None if grad_b is None else grad_b.to(bias_dtype),
            None, None, None,
        )  # fmt: skip
