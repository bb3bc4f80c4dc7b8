"""Student logits at a few ids per row only: the k-sparse path of the renormalized top-k loss.

With ``tail="renormalize"`` the student's distribution is renormalized over the teacher's k ids,
so the loss never looks at the rest of the vocabulary: it needs ``h_i . W[ids_ij]`` only, an
``n x k x H`` product instead of the ``n x V x H`` of a full sweep (``V / k`` times less work:
512x at V=32768, k=64). The ids form a sparse ``n x V`` pattern with k entries per row, so the
three products are sparse kernels: the logits a sampled dense-dense product (SDDMM) on the
pattern, grad-hidden ``G W`` and grad-weight ``G^T h`` sparse-dense products, none of which
materializes a gathered ``n x k x H`` block. torch's sparse kernels take fp32/fp64 only, so bf16
operands are converted, the weight one vocabulary block at a time (``memory_budget_mb``).

``GatheredRows`` has ``rows.FusedRows``' contract for a kernel with one differentiable output,
and takes the category math from the top-k row kernel (``topk._TopKRows.category_terms``).
"""

from __future__ import annotations

import warnings

import torch

from .rows import RowSetup
from .tile_math import accum_dtype, finish_logits, grad_from_terms, logits_grad_to_raw

__all__ = ["GatheredRows"]


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernels used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size=size)


class _Blocks:
    """The ids' entries split by vocabulary block: each block's CSR pattern over the rows."""

    def __init__(self, ids: torch.Tensor, vocab: int, hidden: int, setup: RowSetup) -> None:
        self.ids, (self.n, self.k) = ids, ids.shape
        rows_per_block = max(1, int(setup.tuning.memory_budget_mb * 2**20) // (2 * 4 * hidden))
        self.bounds = [(v0, min(v0 + rows_per_block, vocab)) for v0 in range(0, vocab, rows_per_block)]

    def __iter__(self):
        """(v0, v1, entries mask (n, k), crow, cols) of every block that holds an entry."""
        for v0, v1 in self.bounds:
            inside = (self.ids >= v0) & (self.ids < v1)
            if not bool(inside.any()):
                continue
            crow = torch.zeros(self.n + 1, dtype=torch.long, device=self.ids.device)
            crow[1:] = inside.sum(1).cumsum(0)
            yield v0, v1, inside, crow, self.ids[inside] - v0  # row-major: grouped by row, as CSR wants


def _sweep(hs, ws, bs, kernel, setup: RowSetup, scale: torch.Tensor | None, want) -> tuple[torch.Tensor, list]:
    """Per-row divergence; with ``scale`` the student gradients of ``sum_i scale_i D_i`` (fp32 weight/bias)."""
    n, hidden = hs.shape
    spec, temperature = setup.spec, setup.temperature
    acc = accum_dtype(hs.dtype)
    h = hs.to(acc)
    blocks = _Blocks(kernel.ids, ws.shape[0], hidden, setup)
    raw = torch.zeros(kernel.ids.shape, dtype=acc, device=hs.device)
    for v0, v1, inside, crow, cols in blocks:
        pattern = _csr(crow, cols, torch.zeros(cols.numel(), dtype=acc, device=hs.device), (n, v1 - v0))
        raw[inside] = torch.sparse.sampled_addmm(pattern, h, ws[v0:v1].to(acc).T, beta=0.0).values()
    if bs is not None:
        raw += bs[kernel.ids].to(acc)
    z = finish_logits(raw * spec.scale if spec.scale != 1.0 else raw, spec, temperature)
    top = z.masked_fill(~kernel.valid, float("-inf"))
    lse_top = torch.logsumexp(top, -1)
    terms, a, q = kernel.category_terms(top, lse_top, None, lse_top)
    if scale is None:
        return terms.divergence, [None, None, None]
    g = grad_from_terms(a, q, terms.coef, scale * spec.scale).to(acc)  # dL/d(h W^T + b) after the chain below
    g = logits_grad_to_raw(g, z, spec, temperature).masked_fill_(~kernel.valid, 0.0)
    grads = [
        torch.zeros(n, hidden, dtype=acc, device=hs.device) if want[0] else None,
        torch.zeros(ws.shape, dtype=acc, device=ws.device) if want[1] else None,
        torch.zeros(ws.shape[0], dtype=acc, device=ws.device).index_put_((kernel.ids,), g, accumulate=True)
        if want[2] and bs is not None else None,
    ]  # fmt: skip
    if grads[0] is not None or grads[1] is not None:
        for v0, v1, inside, crow, cols in blocks:
            g_block = _csr(crow, cols, g[inside], (n, v1 - v0))
            if grads[0] is not None:
                grads[0] += torch.sparse.mm(g_block, ws[v0:v1].to(acc))
            if grads[1] is not None:
                grads[1][v0:v1] += torch.sparse.mm(g_block.t(), h)
    if grads[0] is not None:
        grads[0] = grads[0].to(hs.dtype)
    return terms.divergence, grads


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
