"""The gradient GEMMs of the Triton backend, without atomics: logit-gradient stripes handed to torch matmul.

A gradient kernel (``grad``, ``tail_grad``) recomputes the logit tiles of one *vocabulary stripe*
(``V_c`` columns, all rows) and writes ``G = dL/d(h W^T + b)`` into an ``N x V_c`` buffer; then
torch matmul (cuBLAS on a GPU) does ``grad_h += G @ W[stripe]`` and ``grad_W[stripe] = G^T @ h``,
each stripe of grad-weight written once, and ``grad_b[stripe] = sum_rows G``.

Why not fp32 atomics from inside the kernel (the earlier design): the atomic reduction traffic
(``N H V / BLOCK_N`` adds into grad-hidden plus ``V H N / BLOCK_M`` into grad-weight, ~200 GB at
Liger's shape) was about half of the gradient pass, the in-kernel grad GEMMs ran on small MMA
shapes serialized behind those atomics, and the sums were not deterministic. A stripe costs one
``N x V_c`` buffer (sized by ``Tuning.memory_budget_mb``) and hands the two big GEMMs to the
library that runs them at its best; no sum depends on the order atomics land in.

``G`` is in the head's dtype: 16-bit for 16-bit heads (what an in-kernel MMA would have rounded
it to anyway), fp32 for fp32 heads, so fp32 inputs stay exact (torch's fp32 matmul does not use
TF32 unless the user enabled it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...core.call import Tuning
from ...core.engine import Student, StudentGrads, Want
from ..gemm import matmul_fp32

# Writes G for columns [start, stop) into the front columns of the (N, width) buffer it is given.
StripeKernel = Callable[[torch.Tensor, int, int], None]


@dataclass(frozen=True)
class StripePlan:
    """How a gradient pass covers the vocabulary: ``width`` columns per stripe, ``splits`` programs per row block."""

    width: int
    splits: int


@dataclass(frozen=True)
class SparseColumns:
    """Exact gradient entries the kernel leaves at zero: ``values[i, j]`` at column ``ids[i, j]`` where ``valid``.

    The single-head losses' id columns (``tail_grad`` skips them): added into each stripe's buffer
    before its GEMMs, so they cost no separate ``O(n k H)`` pass.
    """

    ids: torch.Tensor  # (n, k) int64, in range everywhere
    values: torch.Tensor  # (n, k) fp32, dL/d(h W^T + b) at those columns
    valid: torch.Tensor  # (n, k) bool

    def add_into(self, buffer: torch.Tensor, start: int, stop: int) -> None:
        here = self.valid & (self.ids >= start) & (self.ids < stop)
        rows = here.nonzero(as_tuple=True)[0]
        buffer.index_put_((rows, self.ids[here] - start), self.values[here].to(buffer.dtype), accumulate=True)


def stripe_width(tuning: Tuning, n_rows: int, vocab: int, dtype: torch.dtype, block_n: int) -> int:
    """Columns per stripe, a multiple of the kernel's ``block_n``.

    ``Tuning.chunk_vocab`` when set (rounded up to a block), else the widest stripe whose
    ``n_rows x V_c`` buffer fits ``Tuning.memory_budget_mb``; never less than one block (the
    floor of what the kernel writes), never more than the vocabulary needs.
    """
    blocks_needed = -(-vocab // block_n)
    if tuning.chunk_vocab is not None:
        blocks = -(-tuning.chunk_vocab // block_n)
    else:
        budget = int(tuning.memory_budget_mb * 2**20)
        blocks = budget // max(1, n_rows * block_n * dtype.itemsize)
    return block_n * max(1, min(blocks, blocks_needed))


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` into the fp32 ``out``, keeping a 16-bit GEMM's fp32 accumulator (``gemm.matmul_fp32``)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += matmul_fp32(a, b)


def stripe_gradients(student: Student, vocab: int, want: Want, width: int, kernel: StripeKernel,
                     sparse: SparseColumns | None = None) -> StudentGrads:
    """Student gradients from ``kernel``'s logit-gradient stripes over columns ``[0, vocab)`` (plus ``sparse``).

    Returns grad-hidden in fp32 (a sum over stripes), grad-weight in the head's dtype (each row
    written once by one GEMM; rows past ``vocab``, a padded head's, are zero) and grad-bias in fp32.
    """
    hs, ws, bs = student
    n = hs.shape[0]
    grad_h = torch.zeros(hs.shape, dtype=torch.float32, device=hs.device) if want.hidden else None
    grad_w = torch.empty(ws.shape, dtype=ws.dtype, device=ws.device) if want.weight else None
    grad_b = torch.zeros(ws.shape[0], dtype=torch.float32, device=ws.device) if want.bias and bs is not None else None
    if grad_w is not None:
        grad_w[vocab:].zero_()
    if n == 0 or not want.any:
        if grad_w is not None:
            grad_w.zero_()
        return StudentGrads(grad_h, grad_w, grad_b)
    buffer = torch.empty(n, min(width, vocab), dtype=ws.dtype, device=hs.device)
    for start in range(0, vocab, width):
        stop = min(start + width, vocab)
        g = buffer[:, : stop - start]
        kernel(buffer, start, stop)
        if sparse is not None:
            sparse.add_into(g, start, stop)
        if grad_h is not None:
            _accumulate(grad_h, g, ws[start:stop])
        if grad_w is not None:
            torch.mm(g.T, hs, out=grad_w[start:stop])
        if grad_b is not None:
            grad_b[start:stop] = g.sum(0, dtype=torch.float32)
    return StudentGrads(grad_h, grad_w, grad_b)
