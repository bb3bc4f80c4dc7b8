"""The chunk loop shared by the torch and native-CPU backends of the two-head divergence.

Tokens are processed in chunks; for each chunk the student and teacher logits tiles come
from torch GEMMs and a *tile math* object (torch: ``tile_math.TorchTileMath``; native:
``cpu_native.NativeTileMath``) turns them into per-row statistics and the logit gradient.
The GEMMs the loss needs are exactly: student logits, teacher logits, grad-hidden and
grad-weight (the floor the benchmarks divide by).

Two regimes, picked by ``plan_chunks`` from the shapes and a memory budget:

* **full rows** (``chunk_vocab == K``, the normal case on CPU): a chunk's whole compared
  vocabulary fits in the budget, so one sweep gives values *and* gradients with no GEMM
  recomputed. The token chunk shrinks as the vocabulary grows, so peak memory stays at the
  budget, flat in N.
* **2-D tiles** (``chunk_vocab < K``, tiny budgets): pass 1 streams an online
  log-sum-exp over vocab tiles, pass 2 accumulates the divergence and the per-row
  gradient coefficient ``c`` (see ``tile_math``), pass 3 recomputes each tile and applies
  its gradient. Extra memory is O(chunk_tokens x chunk_vocab).

``ChunkedEngine`` is this loop as an ``Engine`` (``core.engine``): one run gives the per-row
outputs and, with upstream coefficients, the student gradients (``core.engine.FusedLoss`` decides
when: in the forward of a scalar loss, in backward otherwise); a gradient-only run reuses the
per-row statistics of an earlier one, so the 2-D regime skips its statistics passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from ..core.call import HeadSpec, LossOptions, Tuning
from ..core.engine import TEACHER_HEAD_OUTPUTS, EngineResult, Student, StudentGrads, Upstream, Want, accum_dtype
from .gemm import matmul_fp32
from .tile_math import (
    HardLabels,
    RowTerms,
    add_hard_grad,
    finish_logits,
    grad_from_terms,
    label_logits,
    logits_grad_to_raw,
    tile_terms,
)

_MIN_CHUNK_TOKENS = 16
# Rows of the grad-weight product computed per call when its output needs a dtype change
# (bf16 GEMM -> fp32 accumulator): bounds that temporary to ~32 MB whatever V is.
_GRAD_W_SLICE_ELEMS = 16 * 2**20


class TileMath(Protocol):
    def live_bytes_per_logit(self, dtype: torch.dtype) -> int:
        """Bytes alive per (token, vocab) element of a chunk for inputs of ``dtype`` (sizes chunks)."""
        ...

    def logits_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the chunk's GEMMs write logits in, for inputs of ``dtype``."""
        ...

    def full_rows(
        self,
        raw_s: torch.Tensor,
        raw_t: torch.Tensor,
        opts: LossOptions,
        row_scale: torch.Tensor | None,
        hard: HardLabels | None = None,
        grad_dtype: torch.dtype | None = None,
    ) -> tuple[RowTerms, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Statistics and gradient of whole rows; ``grad_dtype`` is what the gradient GEMMs read (the
        student's dtype): a tile math may return the gradient in it (``GradSink`` converts otherwise)."""
        ...


class RowLogits(Protocol):
    """A tile math's own maker of one head's full-row logits of a chunk, in place of the torch GEMMs (the
    Triton cached mode's GEMM kernel writes a compact cache); ``TileMath.full_rows`` receives what it returns."""

    def buffer_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The element type of the flat per-head scratch buffer it writes into, for inputs of ``dtype``."""
        ...

    def head_logits(self, h: torch.Tensor, head: Head, spec: HeadSpec, temperature: float, vocab: int,
                    buffer: torch.Tensor) -> Any:
        """One head's logits of the chunk ``h`` over its first ``vocab`` columns, in the front of ``buffer``;
        ``spec`` and ``temperature`` make the final logits (a cache may keep statistics of them)."""
        ...


def plan_chunks(n_tokens: int, vocab: int, tuning: Tuning, bytes_per_logit: int) -> tuple[int, int]:
    """(chunk_tokens, chunk_vocab) keeping a chunk's live tiles (``bytes_per_logit`` each element) in budget."""
    budget_elems = int(tuning.memory_budget_mb * 2**20) // bytes_per_logit
    chunk_vocab = min(tuning.chunk_vocab or vocab, vocab)
    if tuning.chunk_vocab is None and budget_elems // vocab < _MIN_CHUNK_TOKENS:
        chunk_vocab = max(256, budget_elems // _MIN_CHUNK_TOKENS // 256 * 256)
        chunk_vocab = min(chunk_vocab, vocab)
    chunk_tokens = tuning.chunk_tokens or max(_MIN_CHUNK_TOKENS, budget_elems // chunk_vocab // 16 * 16)
    return max(1, min(chunk_tokens, n_tokens)), chunk_vocab


class SweepResult(NamedTuple):
    divergence: torch.Tensor
    student_lse: torch.Tensor
    teacher_lse: torch.Tensor
    entropy: torch.Tensor
    coef: torch.Tensor
    cross_entropy: torch.Tensor  # hard-label CE per row (0 without labels)
    hard_lse: torch.Tensor  # log-sum-exp of the temperature-1 student logits (2-D regime with labels)


@dataclass
class Head:
    """One side's operands; ``logits`` gives ``scale * (h W[v0:v1]^T + b[v0:v1])``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float

    def logits(self, h: torch.Tensor, v0: int, v1: int, buffer: torch.Tensor) -> torch.Tensor:
        """The (n, v1 - v0) tile, written into the front of the flat scratch ``buffer``.

        Reusing one buffer per sweep avoids a fresh multi-MB allocation (and its page faults)
        per chunk; the caller consumes the tile before the next call overwrites it.
        """
        w = self.weight[v0:v1]
        out = buffer[: h.shape[0] * (v1 - v0)].view(h.shape[0], v1 - v0)
        if out.dtype != h.dtype:  # a wider logit than the operands (the Triton cached mode's 2-D regime)
            matmul_fp32(h, w.T, out=out)
            if self.bias is not None:
                out.add_(self.bias[v0:v1])
            return out.mul_(self.scale) if self.scale != 1.0 else out
        if self.bias is None:
            torch.mm(h, w.T, out=out)
            return out.mul_(self.scale) if self.scale != 1.0 else out
        return torch.addmm(self.bias[v0:v1], h, w.T, beta=self.scale, alpha=self.scale, out=out)


class GradSink:
    """Student gradient accumulators: grad-hidden per chunk, fp32 grad-weight and grad-bias.

    Tiles arrive already multiplied by the head's logit scale (``ChunkedEngine.run`` folds it into the
    per-row scale), in fp32 or in the GEMM dtype when the tile math wrote them in place.
    """

    def __init__(self, hs: torch.Tensor, head: Head, want: Want, tuning: Tuning) -> None:
        self.want_h, self.want_w, self.want_b = want.hidden, want.weight, want.bias
        self.grad_h = torch.zeros_like(hs) if self.want_h else None
        acc = dict(dtype=accum_dtype(hs.dtype), device=hs.device)
        self.grad_w = torch.zeros(head.weight.shape, **acc) if self.want_w else None
        self.grad_b = torch.zeros(head.weight.shape[0], **acc) if self.want_b else None
        self.weight = head.weight
        self.tuning = tuning
        self._slice: torch.Tensor | None = None  # reused grad-weight GEMM output (see ``add``)

    def add(self, g: torch.Tensor, h: torch.Tensor, rows: slice, v0: int) -> None:
        """Accumulate one tile's dL/d(logits before the scale) ((n, v)) over vocab ``v0:v0+v``."""
        cols = self._kept_columns(g)
        if cols is not None:
            g = g.index_select(1, cols)
            w = self.weight[v0:].index_select(0, cols)
        else:
            w = self.weight[v0 : v0 + g.shape[1]]
        if self.grad_b is not None:
            b = g.sum(0, dtype=self.grad_b.dtype)
            if cols is None:
                self.grad_b[v0 : v0 + g.shape[1]] += b
            else:
                self.grad_b.index_add_(0, cols + v0, b)
        g = g.to(h.dtype)
        if self.grad_h is not None:
            self.grad_h[rows].addmm_(g, w)
        if self.grad_w is None:
            return
        if cols is not None:
            self.grad_w.index_add_(0, cols + v0, (g.T @ h).to(self.grad_w.dtype))
        elif g.dtype == self.grad_w.dtype:
            self.grad_w[v0 : v0 + g.shape[1]].addmm_(g.T, h)  # accumulates in place, no temporary
        else:  # low-precision GEMM: its output is converted into the fp32 accumulator slice by slice
            step = max(1, _GRAD_W_SLICE_ELEMS // h.shape[1])
            if self._slice is None or self._slice.dtype != g.dtype:
                self._slice = torch.empty(min(step, self.grad_w.shape[0]), h.shape[1], dtype=g.dtype, device=g.device)
            for c0 in range(0, g.shape[1], step):
                c1 = min(c0 + step, g.shape[1])
                self.grad_w[v0 + c0 : v0 + c1] += torch.mm(g[:, c0:c1].T, h, out=self._slice[: c1 - c0])

    def _kept_columns(self, g: torch.Tensor) -> torch.Tensor | None:
        """Columns of the vocab blocks whose gradient is not negligible (None: keep all)."""
        eps = self.tuning.grad_filter_eps
        if eps is None:
            return None
        block = self.tuning.filter_block
        col_max = g.abs().amax(0)
        n_blocks = -(-col_max.numel() // block)
        padded = torch.nn.functional.pad(col_max, (0, n_blocks * block - col_max.numel()))
        keep = padded.view(n_blocks, block).amax(1) >= eps
        if bool(keep.all()):
            return None
        cols = torch.arange(n_blocks * block, device=g.device).view(n_blocks, block)[keep].flatten()
        return cols[cols < col_max.numel()]


class _ChunkLogits(NamedTuple):
    """A chunk's student and teacher logits tiles, from GEMMs into reused scratch buffers."""

    h_s: torch.Tensor
    h_t: torch.Tensor
    student: Head
    teacher: Head
    opts: LossOptions
    buffers: tuple[torch.Tensor, torch.Tensor]

    def raw(self, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.student.logits(self.h_s, v0, v1, self.buffers[0]),
                self.teacher.logits(self.h_t, v0, v1, self.buffers[1]))

    def made_by(self, maker: RowLogits, vocab: int) -> tuple[Any, Any]:
        """Both heads' full-row logits from a tile math's own ``RowLogits`` (instead of ``raw``)."""
        o = self.opts
        return (maker.head_logits(self.h_s, self.student, o.student, o.temperature, vocab, self.buffers[0]),
                maker.head_logits(self.h_t, self.teacher, o.teacher, o.temperature, vocab, self.buffers[1]))

    def final(self, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw_s, raw_t = self.raw(v0, v1)
        o = self.opts
        return finish_logits(raw_s, o.student, o.temperature), finish_logits(raw_t, o.teacher, o.temperature)


def _online_lse(chunk: _ChunkLogits, chunk_vocab: int, hard: bool, teacher_lse: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row log-sum-exps of the student, the teacher and (``hard``) the temperature-1 student logits.

    A known ``teacher_lse`` skips the teacher's GEMMs of this pass (the student's alone are swept).
    """
    k, n, t = chunk.opts.vocab_size, chunk.h_s.shape[0], chunk.opts.temperature
    lse_s = torch.full((n,), float("-inf"), dtype=accum_dtype(chunk.h_s.dtype), device=chunk.h_s.device)
    lse_t, lse_y = lse_s.clone(), lse_s.clone()
    for v0 in range(0, k, chunk_vocab):
        v1 = min(v0 + chunk_vocab, k)
        z_s = finish_logits(chunk.student.logits(chunk.h_s, v0, v1, chunk.buffers[0]), chunk.opts.student, t)
        lse_s = torch.logaddexp(lse_s, torch.logsumexp(z_s, -1))
        if hard and t != 1.0:
            lse_y = torch.logaddexp(lse_y, torch.logsumexp(z_s * t, -1))
        if teacher_lse is None:
            z_t = finish_logits(chunk.teacher.logits(chunk.h_t, v0, v1, chunk.buffers[1]), chunk.opts.teacher, t)
            lse_t = torch.logaddexp(lse_t, torch.logsumexp(z_t, -1))
    return lse_s, lse_t if teacher_lse is None else teacher_lse, lse_s if t == 1.0 else lse_y


class ChunkedEngine:
    """The two-head divergence as an ``Engine``: outputs ``divergence`` and ``cross_entropy``
    (0 without labels) are differentiable, the log-sum-exps and the entropy are statistics.

    ``run`` is the chunk loop over all (compacted) rows: with ``upstream`` the student gradient of
    ``sum_i u_i D_i + h_i CE_i`` is accumulated as the tiles go by; ``state`` (the per-row
    statistics of an earlier run) lets the 2-D regime skip its statistics passes, and a known
    ``teacher_lse`` (per compacted row) the teacher's GEMMs of its log-sum-exp pass. The full-row
    regime holds each chunk's teacher logits anyway and takes their log-sum-exp in the same kernel.
    ``row_logits`` (optional) makes the full-row regime's logits instead of the torch GEMMs (the 2-D
    regime keeps those, in ``TileMath.logits_dtype``).
    """

    output_names = TEACHER_HEAD_OUTPUTS
    n_differentiable = 2

    def __init__(self, teacher: Student, opts: LossOptions, tiles: TileMath, tuning: Tuning,
                 labels: torch.Tensor | None, teacher_lse: torch.Tensor | None = None,
                 row_logits: RowLogits | None = None) -> None:
        self.teacher = Head(teacher.weight, teacher.bias, opts.teacher.scale)
        self.teacher_hidden, self.opts, self.tiles, self.tuning = teacher.hidden, opts, tiles, tuning
        self.labels, self.teacher_lse, self.row_logits = labels, teacher_lse, row_logits

    def run(self, student: Student, upstream: Upstream | None, want: Want, state: SweepResult | None = None,
            ) -> EngineResult:
        hs, ht, opts, tiles = student.hidden, self.teacher_hidden, self.opts, self.tiles
        n, k = hs.shape[0], opts.vocab_size
        head = Head(student.weight, student.bias, opts.student.scale)
        acc = dict(dtype=accum_dtype(hs.dtype), device=hs.device)
        sink = GradSink(hs, head, want, self.tuning) if upstream else None
        row_scale, hard = None, None if self.labels is None else HardLabels(self.labels, None)
        if sink is not None:  # the sink takes tiles with the logit scale folded into the row scales
            zeros = torch.zeros(n, **acc)
            row_scale = (zeros if upstream[0] is None else upstream[0]) * head.scale
            if hard is not None:
                hard = HardLabels(self.labels, (zeros if upstream[1] is None else upstream[1]) * head.scale)
        chunk_tokens, chunk_vocab = plan_chunks(n, k, self.tuning, tiles.live_bytes_per_logit(hs.dtype))
        out = SweepResult(*(torch.zeros(n, **acc) for _ in SweepResult._fields)) if state is None else state
        own = self.row_logits if chunk_vocab == k else None
        dtype_of = tiles.logits_dtype if own is None else own.buffer_dtype
        buffers = tuple(torch.empty(chunk_tokens * chunk_vocab, dtype=dtype_of(h.dtype), device=h.device)
                        for h in (hs, ht))
        for i0 in range(0, n, chunk_tokens):
            rows = slice(i0, min(i0 + chunk_tokens, n))
            chunk = _ChunkLogits(hs[rows], ht[rows], head, self.teacher, opts, buffers)
            scale = None if row_scale is None else row_scale[rows]
            chunk_hard = None if hard is None else hard.chunk(rows, None if scale is None else hard.scale[rows])
            if chunk_vocab < k:
                self._tiled_chunk(chunk, chunk_vocab, rows, out, state is None, scale, chunk_hard, sink)
                continue
            raw = chunk.raw(0, k) if own is None else chunk.made_by(own, k)
            terms, lse_s, lse_t, grad = tiles.full_rows(*raw, opts, scale, chunk_hard, hs.dtype)
            if state is None:
                out.divergence[rows], out.coef[rows], out.entropy[rows] = terms.divergence, terms.coef, terms.entropy
                out.student_lse[rows], out.teacher_lse[rows] = lse_s, lse_t
                if hard is not None:  # (hard_lse is only needed by the 2-D regime)
                    out.cross_entropy[rows] = terms.cross_entropy
            if grad is not None and sink is not None:
                sink.add(grad, chunk.h_s, rows, 0)
        outputs = (out.divergence, out.cross_entropy, out.student_lse, out.teacher_lse, out.entropy)
        grads = None if sink is None else StudentGrads(sink.grad_h, sink.grad_w, sink.grad_b)
        return EngineResult(outputs, grads, out)

    def _tiled_chunk(self, chunk: _ChunkLogits, chunk_vocab: int, rows: slice, out: SweepResult, stats: bool,
                     scale: torch.Tensor | None, hard: HardLabels | None, sink: GradSink | None) -> None:
        """The 2-D regime on one token chunk: online LSE, then statistics, then gradient tiles."""
        opts = self.opts
        k, t = opts.vocab_size, opts.temperature
        if stats:
            known = None if self.teacher_lse is None else self.teacher_lse[rows]
            lse_s, lse_t, lse_y = _online_lse(chunk, chunk_vocab, hard is not None, known)
            out.student_lse[rows], out.teacher_lse[rows], out.hard_lse[rows] = lse_s, lse_t, lse_y
            for v0 in range(0, k, chunk_vocab):
                z_s, z_t = chunk.final(v0, min(v0 + chunk_vocab, k))
                if hard is not None:
                    out.cross_entropy[rows] -= label_logits(z_s, hard.labels, v0)[0] * t
                terms, _, _ = tile_terms(z_s, z_t, lse_s, lse_t, opts)
                out.divergence[rows] += terms.divergence
                out.entropy[rows] += terms.entropy
                out.coef[rows] += terms.coef
            if hard is not None:
                labeled = hard.labels >= 0
                out.cross_entropy[rows] = torch.where(labeled, out.cross_entropy[rows] + lse_y, 0.0)
        if scale is None or sink is None:
            return
        for v0 in range(0, k, chunk_vocab):
            z_s, z_t = chunk.final(v0, min(v0 + chunk_vocab, k))
            _, a, q = tile_terms(z_s, z_t, out.student_lse[rows], out.teacher_lse[rows], opts)
            grad = grad_from_terms(a, q, out.coef[rows], scale)
            if hard is not None:
                grad = add_hard_grad(grad, z_s, out.hard_lse[rows], hard, t, v0)
            sink.add(logits_grad_to_raw(grad, z_s, opts.student, t), chunk.h_s, rows, v0)
