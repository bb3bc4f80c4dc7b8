"""Student logits at a few ids per row only: the k-sparse path of the renormalized top-k loss.

With ``tail="renormalize"`` the student's distribution is renormalized over the teacher's k ids,
so the loss never looks at the rest of the vocabulary: it needs ``h_i . W[ids_ij]`` only, an
``n x k x H`` product instead of the ``n x V x H`` of a full sweep (``V / k`` times less work:
512x at V=32768, k=64). The ids form a sparse ``n x V`` pattern with k entries per row, so the
three products are sparse kernels: the logits a sampled dense-dense product (SDDMM) on the
pattern, grad-hidden ``G W`` and grad-weight ``G^T h`` sparse-dense products, none of which
materializes a gathered ``n x k x H`` block. torch's sparse kernels take fp32/fp64 only, so bf16
operands are converted, the weight one vocabulary block at a time (``memory_budget_mb``).

``GatheredEngine`` is this as an ``Engine`` with one output (the divergence), its category math
``row_math.TopKCategories``'.
"""

from __future__ import annotations

import warnings

import torch

from ..core.engine import EngineResult, Student, StudentGrads, Upstream, Want, accum_dtype
from .row_math import TopKCategories
from .rows import RowSetup
from .tile_math import finish_logits, grad_from_terms, logits_grad_to_raw

__all__ = ["GatheredEngine"]


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


def _sweep(hs, ws, bs, kernel: TopKCategories, setup: RowSetup, scale: torch.Tensor | None, want: Want,
           ) -> tuple[torch.Tensor, StudentGrads | None]:
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
        return terms.divergence, None
    g = grad_from_terms(a, q, terms.coef, scale * spec.scale).to(acc)  # dL/d(h W^T + b) after the chain below
    g = logits_grad_to_raw(g, z, spec, temperature).masked_fill_(~kernel.valid, 0.0)
    grads = [
        torch.zeros(n, hidden, dtype=acc, device=hs.device) if want.hidden else None,
        torch.zeros(ws.shape, dtype=acc, device=ws.device) if want.weight else None,
        torch.zeros(ws.shape[0], dtype=acc, device=ws.device).index_put_((kernel.ids,), g, accumulate=True)
        if want.bias else None,
    ]
    if grads[0] is not None or grads[1] is not None:
        for v0, v1, inside, crow, cols in blocks:
            g_block = _csr(crow, cols, g[inside], (n, v1 - v0))
            if grads[0] is not None:
                grads[0] += torch.sparse.mm(g_block, ws[v0:v1].to(acc))
            if grads[1] is not None:
                grads[1][v0:v1] += torch.sparse.mm(g_block.t(), h)
    return terms.divergence, StudentGrads(*grads)


class GatheredEngine:
    """The renormalized top-k divergence from the k id logits only, as an ``Engine``."""

    output_names = ("divergence",)
    n_differentiable = 1

    def __init__(self, categories: TopKCategories, setup: RowSetup) -> None:
        self.categories, self.setup = categories, setup

    def run(self, student: Student, upstream: Upstream | None, want: Want, state: None = None) -> EngineResult:
        scale = None if upstream is None else upstream[0]
        if upstream is not None and scale is None:
            hs = student.hidden
            scale = torch.zeros(hs.shape[0], dtype=accum_dtype(hs.dtype), device=hs.device)
        divergence, grads = _sweep(*student, self.categories, self.setup, scale, want)
        return EngineResult((divergence,), grads)
