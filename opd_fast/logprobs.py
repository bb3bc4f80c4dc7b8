"""Per-token log-probabilities (and entropy) straight from hidden states and an LM head.

Uses: the sampler's log-probs for importance weights, the teacher's log-probs of the sampled
tokens, and the single-sample reverse-KL estimator ``log q(y) - log p(y)``, none of which may
hold an ``N x V`` logits tensor.

This module also holds the *full-row sweep* that ``opd_fast.topk`` shares: the token-chunk
loop of ``backends.chunked`` specialized to losses of one head whose per-row outputs need the
whole (compared) vocabulary row at once. It reuses that module's GEMM tile (``Head``), chunk
plan and gradient accumulators (``GradSink``) and ``tile_math``'s logit finishing, and only
swaps the per-tile math for a ``RowKernel``. (It would sit naturally in ``backends/``; it lives
here while that package is being reworked.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from . import reference
from .backends.chunked import GradSink, Head, Tuning, plan_chunks
from .backends.tile_math import accum_dtype, finish_logits, logits_grad_to_raw
from .validation import HeadSpec, resolve_torch_only_backend, validate_logprobs_call

__all__ = ["FusedRows", "RowKernel", "RowSetup", "fused_linear_logprobs", "sweep_rows"]

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
        z = finish_logits(head.logits(h, 0, vocab, buffer), setup.spec, setup.temperature)
        chunk_up = None if upstream is None else [None if u is None else u[rows] for u in upstream]
        values, grad = kernel(z, rows, chunk_up)
        for out, value in zip(outs, values, strict=True):
            out[rows] = value
        if grad is not None and sink is not None:
            sink.add(logits_grad_to_raw(grad, z, setup.spec, setup.temperature), h, rows, 0)
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


class _LogProbRows:
    """``log q(y)`` per row and optionally the entropy ``H = -sum q log q`` of ``q = softmax(z)``.

    Gradients: ``d log q(y)/dz = onehot(y) - q`` and ``dH/dz = -q (log q + H)``.
    """

    def __init__(self, token_ids: torch.Tensor, entropy: bool) -> None:
        self.token_ids = token_ids
        self.entropy = entropy
        self.n_outputs = self.n_differentiable = 2 if entropy else 1

    def __call__(
        self, z: torch.Tensor, rows: slice, upstream: Upstream | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        y = self.token_ids[rows, None]
        lse = torch.logsumexp(z, -1)
        outs = [z.gather(1, y).squeeze(1) - lse]
        if not self.entropy and upstream is None:
            return outs, None
        log_q = z - lse[:, None]
        q = log_q.exp() if self.entropy else log_q.exp_()
        if self.entropy:
            log_q.masked_fill_(q == 0, 0.0)  # 0 log 0 = 0, and no 0 * inf in the gradient below
            outs.append(-(q * log_q).sum(-1))
        if upstream is None:
            return outs, None
        u_lp = upstream[0] if upstream[0] is not None else lse.new_zeros(lse.shape)
        u_ent = upstream[1] if self.entropy else None
        if u_ent is None:
            grad = q.mul_(-u_lp[:, None])
        else:
            grad = log_q.add_(outs[1][:, None]).mul_(u_ent[:, None]).add_(u_lp[:, None]).mul_(q).neg_()
        return outs, grad.scatter_add_(1, y, u_lp[:, None])


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    tuning: Tuning | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each given token under ``softmax(z)``, without materializing logits.

    ``z = softcap(logit_scale * (hidden @ weight^T + bias)) / temperature`` (the contract's head).

    Args:
        hidden: ``(..., H)``; gets a gradient, as do ``weight`` ``(V, H)`` and ``bias`` ``(V,)``.
        token_ids: integer, the leading shape of ``hidden``, values in ``[0, V)``.
        return_entropy: also return the entropy of the whole distribution per token.
        backend: ``"auto"``/``"torch"`` (token-chunked torch, ``chunk x V`` tiles) or
            ``"reference"`` (float64, materialized). ``"cpu"``/``"triton"`` raise
            ``NotImplementedError``: no native kernel exists for this function yet.
        tuning: chunk size / memory budget (``Tuning.chunk_vocab`` is not used: rows are whole).

    Returns:
        Log-probs with the leading shape (fp32; float64 for float64 inputs), and the entropy when
        asked. Both are differentiable; any incoming gradient (e.g. importance weights) is honoured
        by recomputing the logits chunk by chunk in backward.
    """
    if resolve_torch_only_backend("fused_linear_logprobs", backend) == "reference":
        return reference.fused_linear_logprobs(
            hidden, weight, token_ids, temperature=temperature, bias=bias, logit_scale=logit_scale,
            softcap=softcap, return_entropy=return_entropy,
        )  # fmt: skip
    spec = validate_logprobs_call(
        hidden, weight, token_ids, temperature=temperature, bias=bias, logit_scale=logit_scale, softcap=softcap
    )
    setup = RowSetup(spec, float(temperature), weight.shape[0], tuning or Tuning())
    outs = FusedRows.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(),
        _LogProbRows(token_ids.reshape(-1).long(), return_entropy), setup, None,
    )  # fmt: skip
    logprobs, *entropy = (out.reshape(token_ids.shape) for out in outs)
    return (logprobs, entropy[0]) if return_entropy else logprobs
