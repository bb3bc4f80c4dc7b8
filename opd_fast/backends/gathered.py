"""Student logits at a few ids per row only: the k-sparse path of the renormalized top-k loss.

With ``tail="renormalize"`` the student's distribution is renormalized over the teacher's k ids,
so the loss never looks at the rest of the vocabulary: the logits it needs are ``h . W[ids]``, an
``n x k x H`` gather GEMM instead of the ``n x V x H`` of a full sweep (``V / k`` times less work
and weight traffic: 512x at V=32768, k=64). Rows are chunked so that the gathered ``(chunk, k, H)``
weight block and its gradient products stay within the memory budget.

``GatheredRows`` has ``rows.FusedRows``' contract for a kernel with one differentiable output,
and takes the category math from the top-k row kernel (``topk._TopKRows.category_terms``).
"""

from __future__ import annotations

import torch

from .rows import RowSetup
from .tile_math import accum_dtype, finish_logits, grad_from_terms, logits_grad_to_raw

__all__ = ["GatheredRows"]

# (chunk, k, H) blocks alive at once: the gathered weights and the grad-weight product.
_LIVE_BLOCKS = 2


def _chunk_rows(n: int, k: int, hidden: int, itemsize: int, setup: RowSetup) -> int:
    per_row = max(1, _LIVE_BLOCKS * k * hidden * max(itemsize, 4))
    return max(1, min(n, int(setup.tuning.memory_budget_mb * 2**20) // per_row))


def _sweep(hs, ws, bs, kernel, setup: RowSetup, scale: torch.Tensor | None, want) -> tuple[torch.Tensor, list]:
    """Per-row divergence; with ``scale`` the student gradients of ``sum_i scale_i D_i`` (fp32 weight/bias)."""
    n, hidden = hs.shape
    k = kernel.ids.shape[1]
    spec, temperature = setup.spec, setup.temperature
    acc = accum_dtype(hs.dtype)
    out = torch.zeros(n, dtype=acc, device=hs.device)
    grads: list[torch.Tensor | None] = [None, None, None]
    if scale is not None:
        grads = [
            torch.zeros_like(hs) if want[0] else None,
            torch.zeros(ws.shape, dtype=acc, device=ws.device) if want[1] else None,
            torch.zeros(ws.shape[0], dtype=acc, device=ws.device) if want[2] and bs is not None else None,
        ]
        scale = scale * spec.scale  # the gradient is taken with respect to h W^T + b
    chunk = _chunk_rows(n, k, hidden, hs.element_size(), setup)
    for i0 in range(0, n, chunk):
        rows = slice(i0, min(i0 + chunk, n))
        ids, valid, h = kernel.ids[rows], kernel.valid[rows], hs[rows]
        w = ws.index_select(0, ids.reshape(-1)).view(-1, k, hidden)  # (c, k, H)
        raw = torch.bmm(w, h.unsqueeze(2)).squeeze(2)
        if bs is not None:
            raw = raw + bs[ids]
        z = finish_logits(raw * spec.scale if spec.scale != 1.0 else raw, spec, temperature)
        top = z.masked_fill(~valid, float("-inf"))
        lse_top = torch.logsumexp(top, -1)
        terms, a, q = kernel.category_terms(top, lse_top, None, lse_top, rows)
        out[rows] = terms.divergence
        if scale is None:
            continue
        g = grad_from_terms(a, q, terms.coef, scale[rows])
        g = logits_grad_to_raw(g.to(acc), z, spec, temperature).masked_fill_(~valid, 0.0)  # (c, k) dL/d(h W^T + b)
        flat_ids = ids.reshape(-1)
        if grads[0] is not None:
            grads[0][rows] += torch.bmm(g.to(w.dtype).unsqueeze(1), w).squeeze(1)
        if grads[1] is not None:
            grads[1].index_add_(0, flat_ids, (g.unsqueeze(2) * h.to(acc).unsqueeze(1)).reshape(-1, hidden))
        if grads[2] is not None:
            grads[2].index_add_(0, flat_ids, g.reshape(-1))
    return out, grads


class GatheredRows(torch.autograd.Function):
    """``FusedRows``' contract on the gathered logits: ``row_weights`` given -> ``(value, divergence)``
    with gradients computed in the forward; ``None`` -> ``(divergence,)``, gradients in backward."""

    @staticmethod
    def forward(ctx, hs, ws, bs, kernel, setup: RowSetup, row_weights):
        want = tuple(ctx.needs_input_grad[:3])
        ctx.set_materialize_grads(False)
        ctx.dtypes = (ws.dtype, None if bs is None else bs.dtype)
        with torch.no_grad():
            if row_weights is None:
                div, _ = _sweep(hs, ws, bs, kernel, setup, None, want)
                ctx.save_for_backward(hs, ws, bs)
                ctx.meta = (kernel, setup, want)
                return (div,)
            div, grads = _sweep(hs, ws, bs, kernel, setup, row_weights if any(want) else None, want)
            ctx.save_for_backward(*grads)
            ctx.meta = None
            ctx.mark_non_differentiable(div)
            return (div * row_weights).sum(), div

    @staticmethod
    def backward(ctx, grad, *_):
        if grad is None:
            return (None,) * 6
        if ctx.meta is None:
            grads = [None if t is None else t * grad.to(t.dtype) for t in ctx.saved_tensors]
        else:
            hs, ws, bs = ctx.saved_tensors
            kernel, setup, want = ctx.meta
            with torch.no_grad():
                _, grads = _sweep(hs, ws, bs, kernel, setup, grad.to(accum_dtype(hs.dtype)), want)
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            grads[0],
            None if grads[1] is None else grads[1].to(weight_dtype),
            None if grads[2] is None else grads[2].to(bias_dtype),
            None, None, None,
        )  # fmt: skip
