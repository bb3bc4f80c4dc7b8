"""The chunk loop and autograd glue shared by the torch and native-CPU backends.

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

When the loss is a scalar (``reduction`` mean/sum) the student gradients are computed in
the forward sweep and only scaled in backward; with ``reduction="none"`` the forward keeps
per-row statistics and backward recomputes with the incoming per-token gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from ..validation import LossOptions
from .tile_math import (
    HardLabels,
    RowTerms,
    accum_dtype,
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


@dataclass(frozen=True)
class Tuning:
    """Chunking knobs of the chunked backends. ``None`` means "choose from the shapes".

    ``grad_filter_eps``: skip the gradient GEMMs of every ``filter_block``-wide vocab block in
    which all |dL/dlogit| of the chunk are below ``eps`` (an absolute threshold on the gradient
    of the *reduced* loss, so it already includes the reduction's 1/num_items; Cut
    Cross-Entropy's gradient filtering). The error it introduces is at most
    ``eps * sum_v |W_v|`` per row of grad-hidden and ``eps * sum_i |h_i|`` per row of
    grad-weight, summed over skipped blocks; it is off by default because no fixed eps keeps
    that bound under every dtype's tolerance for every input.
    """

    chunk_tokens: int | None = None
    chunk_vocab: int | None = None
    memory_budget_mb: float = 256.0
    grad_filter_eps: float | None = None
    filter_block: int = 512

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "chunk_vocab"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Tuning.{name} must be a positive int or None, got {value!r}")
        if self.memory_budget_mb <= 0:
            raise ValueError(f"Tuning.memory_budget_mb must be > 0, got {self.memory_budget_mb!r}")
        if self.grad_filter_eps is not None and self.grad_filter_eps < 0:
            raise ValueError(f"Tuning.grad_filter_eps must be >= 0 or None, got {self.grad_filter_eps!r}")


class TileMath(Protocol):
    name: str

    def live_bytes_per_logit(self, dtype: torch.dtype) -> int:
        """Bytes alive per (token, vocab) element of a chunk for logits of ``dtype`` (sizes chunks)."""
        ...

    def full_rows(
        self,
        raw_s: torch.Tensor,
        raw_t: torch.Tensor,
        opts: LossOptions,
        row_scale: torch.Tensor | None,
        hard: HardLabels | None = None,
    ) -> tuple[RowTerms, torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


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
        if self.bias is None:
            torch.mm(h, w.T, out=out)
            return out.mul_(self.scale) if self.scale != 1.0 else out
        return torch.addmm(self.bias[v0:v1], h, w.T, beta=self.scale, alpha=self.scale, out=out)


class GradSink:
    """Student gradient accumulators: grad-hidden per chunk, fp32 grad-weight and grad-bias.

    Tiles arrive already multiplied by the head's logit scale (``sweep`` folds it into the
    per-row scale), in fp32 or in the GEMM dtype when the tile math wrote them in place.
    """

    def __init__(self, hs: torch.Tensor, head: Head, want: tuple[bool, bool, bool], tuning: Tuning) -> None:
        self.want_h, self.want_w, self.want_b = want
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
                self.teacher.logits(self.h_t, v0, v1, self.buffers[1]))  # fmt: skip

    def final(self, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw_s, raw_t = self.raw(v0, v1)
        o = self.opts
        return finish_logits(raw_s, o.student, o.temperature), finish_logits(raw_t, o.teacher, o.temperature)


def _online_lse(chunk: _ChunkLogits, chunk_vocab: int, hard: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row log-sum-exps of the student, the teacher and (``hard``) the temperature-1 student logits."""
    k, n, t = chunk.opts.vocab_size, chunk.h_s.shape[0], chunk.opts.temperature
    lse_s = torch.full((n,), float("-inf"), dtype=accum_dtype(chunk.h_s.dtype), device=chunk.h_s.device)
    lse_t, lse_y = lse_s.clone(), lse_s.clone()
    for v0 in range(0, k, chunk_vocab):
        z_s, z_t = chunk.final(v0, min(v0 + chunk_vocab, k))
        lse_s = torch.logaddexp(lse_s, torch.logsumexp(z_s, -1))
        lse_t = torch.logaddexp(lse_t, torch.logsumexp(z_t, -1))
        if hard and t != 1.0:
            lse_y = torch.logaddexp(lse_y, torch.logsumexp(z_s * t, -1))
    return lse_s, lse_t, lse_s if t == 1.0 else lse_y


def sweep(
    hs: torch.Tensor,
    student: Head,
    ht: torch.Tensor,
    teacher: Head,
    opts: LossOptions,
    tiles: TileMath,
    tuning: Tuning,
    row_scale: torch.Tensor | None = None,
    sink: GradSink | None = None,
    known: SweepResult | None = None,
    hard: HardLabels | None = None,
) -> SweepResult:
    """One pass of the chunk loop over all (compacted) rows.

    With ``row_scale`` and ``sink`` the student gradient of ``sum_i row_scale_i * D_i`` (plus
    ``hard.scale_i * CE_i`` with hard labels; ``hard.scale`` is None when ``row_scale`` is) is
    accumulated into ``sink``. ``known`` (per-row stats of an earlier sweep) lets the 2-D
    regime skip its statistics passes.
    """
    n, k, t = hs.shape[0], opts.vocab_size, opts.temperature
    chunk_tokens, chunk_vocab = plan_chunks(n, k, tuning, tiles.live_bytes_per_logit(hs.dtype))
    acc = dict(dtype=accum_dtype(hs.dtype), device=hs.device)
    out = SweepResult(*(torch.zeros(n, **acc) for _ in SweepResult._fields)) if known is None else known
    if row_scale is not None and student.scale != 1.0:
        row_scale = row_scale * student.scale  # the sink then takes tiles as they come
        hard = None if hard is None else HardLabels(hard.labels, hard.scale * student.scale)
    buffers = tuple(torch.empty(chunk_tokens * chunk_vocab, dtype=h.dtype, device=h.device) for h in (hs, ht))
    for i0 in range(0, n, chunk_tokens):
        rows = slice(i0, min(i0 + chunk_tokens, n))
        chunk = _ChunkLogits(hs[rows], ht[rows], student, teacher, opts, buffers)
        scale = None if row_scale is None else row_scale[rows]
        chunk_hard = None if hard is None else hard.chunk(rows, None if scale is None else hard.scale[rows])
        if chunk_vocab >= k:
            terms, lse_s, lse_t, grad = tiles.full_rows(*chunk.raw(0, k), opts, scale, chunk_hard)
            if known is None:
                stats = [terms.divergence, lse_s, lse_t, terms.entropy, terms.coef]
                if hard is not None:
                    stats.append(terms.cross_entropy)
                for dst, src in zip(out, stats, strict=False):  # hard_lse is only kept by the 2-D regime
                    dst[rows] = src
            if grad is not None and sink is not None:
                sink.add(grad, chunk.h_s, rows, 0)
            continue
        if known is None:
            lse_s, lse_t, lse_y = _online_lse(chunk, chunk_vocab, hard is not None)
            out.student_lse[rows], out.teacher_lse[rows], out.hard_lse[rows] = lse_s, lse_t, lse_y
            for v0 in range(0, k, chunk_vocab):
                z_s, z_t = chunk.final(v0, min(v0 + chunk_vocab, k))
                if hard is not None:
                    out.cross_entropy[rows] -= label_logits(z_s, chunk_hard.labels, v0)[0] * t
                terms, _, _ = tile_terms(z_s, z_t, lse_s, lse_t, opts)
                out.divergence[rows] += terms.divergence
                out.entropy[rows] += terms.entropy
                out.coef[rows] += terms.coef
            if hard is not None:
                labeled = chunk_hard.labels >= 0
                out.cross_entropy[rows] = torch.where(labeled, out.cross_entropy[rows] + lse_y, 0.0)
        if scale is None or sink is None:
            continue
        for v0 in range(0, k, chunk_vocab):
            z_s, z_t = chunk.final(v0, min(v0 + chunk_vocab, k))
            _, a, q = tile_terms(z_s, z_t, out.student_lse[rows], out.teacher_lse[rows], opts)
            grad = grad_from_terms(a, q, out.coef[rows], scale)
            if chunk_hard is not None:
                grad = add_hard_grad(grad, z_s, out.hard_lse[rows], chunk_hard, t, v0)
            sink.add(logits_grad_to_raw(grad, z_s, opts.student, t), chunk.h_s, rows, v0)
    return out


class ChunkedDivergence(torch.autograd.Function):
    """Autograd glue: inputs are compacted 2-D rows; returns (values, *per-row stats).

    ``hard`` (optional ``HardLabels``): labels and each row's coefficient of its cross-entropy,
    so the value is ``sum_i row_weights_i D_i + hard.scale_i CE_i`` (per row for ``"none"``).
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, row_weights, opts, tiles, tuning, scalar, hard=None):
        want = (hs.requires_grad, ws.requires_grad, bs is not None and bs.requires_grad)
        student = Head(ws, bs, opts.student.scale)
        teacher = Head(wt, bt, opts.teacher.scale)
        with torch.no_grad():
            if scalar:
                sink = GradSink(hs, student, want, tuning) if any(want) else None
                res = sweep(hs, student, ht, teacher, opts, tiles, tuning, row_scale=row_weights if sink else None,
                            sink=sink, hard=None if hard is None else hard._replace(scale=hard.scale if sink else None))
                grads = (None, None, None) if sink is None else (sink.grad_h, sink.grad_w, sink.grad_b)
                ctx.save_for_backward(*grads)
            else:
                res = sweep(hs, student, ht, teacher, opts, tiles, tuning,
                            hard=None if hard is None else hard._replace(scale=None))
                ctx.save_for_backward(hs, ws, bs, ht, wt, bt, row_weights, *res)
                ctx.hard = hard
            value = res.divergence * row_weights
            if hard is not None:
                value += res.cross_entropy * hard.scale
            if scalar:
                value = value.sum()
        ctx.meta = (opts, tiles, tuning, scalar, want)
        ctx.weight_dtype = ws.dtype
        ctx.bias_dtype = None if bs is None else bs.dtype
        stats = (res.divergence, res.student_lse, res.teacher_lse, res.entropy, res.cross_entropy)
        ctx.mark_non_differentiable(*stats)
        return (value, *stats)

    @staticmethod
    def backward(ctx, grad_value, *_):
        opts, tiles, tuning, scalar, want = ctx.meta
        if scalar:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            if bool(grad_value != 1):  # a plain loss.backward() passes 1: skip three full-size passes
                grad_h = None if grad_h is None else grad_h * grad_value.to(grad_h.dtype)
                grad_w = None if grad_w is None else (grad_w * grad_value)
                grad_b = None if grad_b is None else (grad_b * grad_value)
        else:
            hs, ws, bs, ht, wt, bt, row_weights, *res = ctx.saved_tensors
            student = Head(ws, bs, opts.student.scale)
            sink = GradSink(hs, student, want, tuning)
            grad_value = grad_value.to(row_weights.dtype)
            hard = None if ctx.hard is None else ctx.hard._replace(scale=grad_value * ctx.hard.scale)
            with torch.no_grad():
                sweep(hs, student, ht, Head(wt, bt, opts.teacher.scale), opts, tiles, tuning,
                      row_scale=grad_value * row_weights, sink=sink, known=SweepResult(*res), hard=hard)
            grad_h, grad_w, grad_b = sink.grad_h, sink.grad_w, sink.grad_b
        return (
            grad_h,
            None if grad_w is None else grad_w.to(ctx.weight_dtype),
            None if grad_b is None else grad_b.to(ctx.bias_dtype),
            None, None, None, None, None, None, None, None, None,
        )  # fmt: skip
