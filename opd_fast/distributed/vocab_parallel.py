"""Vocabulary-parallel engines: each rank sweeps its own shard of the heads, all-reduces the few
per-row numbers a divergence needs, and the result equals the unsharded loss on every rank.

Every loss here is a sum over vocabulary entries once the row's log-sum-exps are known
(``backends/tile_math.py``: values, entropy and the gradient coefficient ``c`` are sums over a
tile, given the full-row log-sum-exps). A shard is such a tile, so per token chunk:

1. each rank forms its shard's logits tile (the GEMMs, on its rows only) and its local
   log-sum-exps; one all-gather gives the whole row's;
2. the tile math gives the shard's partial sums; one all-reduce (two-head loss) or the same
   all-gather (single-head losses, whose per-row math needs only a few numbers per shard) gives
   the row's values, identical on every rank;
3. the gradient of the shard's logits goes into the shard's weight and bias gradients (they stay
   sharded) and into a partial hidden-state gradient, all-reduced once per call so it is complete
   on every rank (the hidden states are replicated, as in Megatron's vocab-parallel cross-entropy:
   do not all-reduce it again in a copy-to-tensor-parallel region's backward).

The tile math is the torch one (``tile_math``) whatever ``backend`` the caller asked for: the
native and Triton kernels fuse the log-sum-exp with the rest of their sweep, which a shard cannot
do before the all-gather. The tile stays in memory across a chunk's collectives, so each logits
GEMM runs once, and token chunks are planned from the widest shard so that every rank makes the
same collectives in the same order.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from ..backends.chunked import GradSink, Head, plan_chunks
from ..backends.row_math import TopKCategories
from ..backends.tile_math import (
    HardLabels,
    add_hard_grad,
    finish_logits,
    grad_from_terms,
    label_logits,
    logits_grad_to_raw,
    tile_terms,
)
from ..core.call import LossCall, LossOptions, SampledTokens, TeacherHead, TopKTeacher, Tuning, VocabShard
from ..core.engine import (
    TEACHER_HEAD_OUTPUTS,
    Engine,
    EngineResult,
    Student,
    StudentGrads,
    Upstream,
    Want,
    accum_dtype,
    logprob_outputs,
    topk_outputs,
)
from ..core.tokens import TokenRows

__all__ = ["ShardedHeadsEngine", "ShardedLogProbs", "ShardedRowsEngine", "ShardedTopK", "shard_rows", "sharded_engine"]

_NEG_INF = float("-inf")
_LIVE_TILES = 6  # fp32 (n, V_shard) tiles alive at once: two logits tiles, q, p, a, a temporary


def _all_gather(shard: VocabShard, x: torch.Tensor) -> torch.Tensor:
    """``(world, *x.shape)``: every rank's ``x``."""
    parts = [torch.empty_like(x) for _ in shard.rows_per_rank]
    dist.all_gather(parts, x.contiguous(), group=shard.group)
    return torch.stack(parts)


def _all_reduce(shard: VocabShard, x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x, group=shard.group)
    return x


def _chunk_tokens(n: int, shard: VocabShard, vocab: int, tuning: Tuning, dtype: torch.dtype) -> int:
    widest = shard.widest(vocab)
    bytes_per_logit = _LIVE_TILES * accum_dtype(dtype).itemsize
    return plan_chunks(n, widest, replace(tuning, chunk_vocab=widest), bytes_per_logit)[0]


def _shard_entropy(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The entropy of the shard's own softmax (``lse`` its log-sum-exp), 0 log 0 = 0."""
    return torch.special.entr((z - lse[:, None]).exp()).sum(-1)


def _combine_entropy(lse_r: torch.Tensor, entropy_r: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The row's entropy from each shard's ``(world, n)`` log-sum-exp and own-softmax entropy.

    With ``w_r = exp(lse_r - lse)`` the shard's mass, ``H = sum_r w_r (H_r - log w_r)``; an empty
    shard (``w_r = 0``) adds nothing.
    """
    log_w = lse_r - lse
    w = log_w.exp()
    return torch.where(w == 0, 0.0, w * (entropy_r - log_w)).sum(0)


class ShardedHeadsEngine:
    """The two-head divergence on vocabulary shards (outputs as ``backends.chunked.ChunkedEngine``)."""

    output_names = TEACHER_HEAD_OUTPUTS
    n_differentiable = 2

    def __init__(self, teacher: Student, opts: LossOptions, tuning: Tuning, labels: torch.Tensor | None,
                 shard: VocabShard) -> None:
        self.teacher = Head(teacher.weight, teacher.bias, opts.teacher.scale)
        self.teacher_hidden, self.opts, self.tuning, self.labels, self.shard = (
            teacher.hidden, opts, tuning, labels, shard)

    def run(self, student: Student, upstream: Upstream | None, want: Want, state: None = None) -> EngineResult:
        hs, ht, opts, shard = student.hidden, self.teacher_hidden, self.opts, self.shard
        n, t, width, v0 = hs.shape[0], opts.temperature, shard.compared(opts.vocab_size), shard.offset
        head = Head(student.weight, student.bias, opts.student.scale)
        acc = dict(dtype=accum_dtype(hs.dtype), device=hs.device)
        sink = GradSink(hs, head, want, self.tuning) if upstream else None
        outs = {name: torch.zeros(n, **acc) for name in self.output_names}
        chunk = _chunk_tokens(n, shard, opts.vocab_size, self.tuning, hs.dtype)
        buffers = tuple(torch.empty(chunk * width, dtype=h.dtype, device=h.device) for h in (hs, ht))
        for i0 in range(0, n, chunk):
            rows = slice(i0, min(i0 + chunk, n))
            labels = None if self.labels is None else self.labels[rows]
            z_s = finish_logits(head.logits(hs[rows], 0, width, buffers[0]), opts.student, t)
            z_t = finish_logits(self.teacher.logits(ht[rows], 0, width, buffers[1]), opts.teacher, t)
            local = [torch.logsumexp(z_s, -1), torch.logsumexp(z_t, -1)]
            if labels is not None and t != 1.0:
                local.append(torch.logsumexp(z_s * t, -1))
            lse = torch.logsumexp(_all_gather(shard, torch.stack(local)), 0)
            lse_s, lse_t = lse[0], lse[1]
            lse_y = lse[2] if len(local) == 3 else lse_s  # the temperature-1 log-sum-exp of the hard labels
            terms, a, q = tile_terms(z_s, z_t, lse_s, lse_t, opts)
            parts = [terms.divergence, terms.entropy, terms.coef]
            if labels is not None:
                parts.append(-label_logits(z_s, labels, v0)[0] * t)
            divergence, entropy, coef, *label_part = _all_reduce(shard, torch.stack(parts))
            outs["divergence"][rows], outs["student_entropy"][rows] = divergence, entropy
            outs["student_lse"][rows], outs["teacher_lse"][rows] = lse_s, lse_t
            if labels is not None:
                outs["cross_entropy"][rows] = torch.where(labels >= 0, lse_y + label_part[0], 0.0)
            if sink is None:
                continue
            grad = grad_from_terms(a, q, coef, _scale(upstream[0], rows, head.scale, lse_s))
            if labels is not None:
                hard = HardLabels(labels, _scale(upstream[1], rows, head.scale, lse_s))
                grad = add_hard_grad(grad, z_s, lse_y, hard, t, v0)
            sink.add(logits_grad_to_raw(grad, z_s, opts.student, t), hs[rows], rows, 0)
        return EngineResult(tuple(outs.values()), _complete(shard, sink))


def _scale(up: torch.Tensor | None, rows: slice, head_scale: float, like: torch.Tensor) -> torch.Tensor:
    """A chunk's per-row gradient scale of one output, the head's logit scale folded in (0: none)."""
    return torch.zeros_like(like) if up is None else up[rows] * head_scale


def _complete(shard: VocabShard, sink: GradSink | None) -> StudentGrads | None:
    """The shard's gradients, the hidden-state one summed over the group (weight and bias stay sharded)."""
    if sink is None:
        return None
    if sink.grad_h is not None:
        _all_reduce(shard, sink.grad_h)
    return StudentGrads(sink.grad_h, sink.grad_w, sink.grad_b)


class ShardedTopK:
    """The top-k teacher loss on a shard (outputs as ``backends.row_math.TopKRows``).

    Per row each shard contributes its log-sum-exp, its log-sum-exp outside the teacher's ids, its
    own-softmax entropy and the logits of the ids it holds (0 for the others): the category math then
    runs on the whole row's numbers, the same on every rank.
    """

    n_differentiable = 1

    def __init__(self, categories: TopKCategories, entropy: bool) -> None:
        self.categories, self.entropy = categories, entropy
        self.output_names = topk_outputs(entropy)

    def __call__(self, z: torch.Tensor, rows: slice, upstream: Upstream | None, shard: VocabShard,
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        cats = self.categories
        ids, valid = cats.ids[rows], cats.valid[rows]
        k, v0 = ids.shape[1], shard.offset
        inside = (ids >= v0) & (ids < v0 + z.shape[1]) & cats.any_valid[rows]
        column = torch.where(inside, ids - v0, 0)
        z_ids = torch.where(inside, z.gather(1, column), 0.0)
        held = torch.zeros_like(z).scatter_add_(1, column, inside.to(z.dtype)) > 0
        z_tail = z.masked_fill(held, _NEG_INF)  # the shard's logits outside the teacher's ids
        lse_r = torch.logsumexp(z, -1)
        local = [lse_r, torch.logsumexp(z_tail, -1)]
        if self.entropy:
            local.append(_shard_entropy(z, lse_r))
        gathered = _all_gather(shard, torch.cat([torch.stack(local, 1), z_ids], 1))  # (world, n, 2|3 + k)
        lse_all, tail_all = gathered[:, :, 0], gathered[:, :, 1]
        top = gathered[:, :, -k:].sum(0).masked_fill(~valid, _NEG_INF)
        lse_top = torch.logsumexp(top, -1)
        if cats.bucket:
            lse_tail = torch.logsumexp(tail_all, 0)
            lse = torch.logaddexp(lse_tail, lse_top)
        else:
            lse_tail, lse = None, torch.logsumexp(lse_all, 0)
        terms, a, q = cats.category_terms(top, lse_top, lse_tail, lse, rows)
        outs = [terms.divergence, lse, (lse_top - lse).exp()]
        if self.entropy:
            outs.append(_combine_entropy(lse_all, gathered[:, :, 2], lse))
        if upstream is None or upstream[0] is None:
            return outs, None
        grad_cat = grad_from_terms(a, q, terms.coef, upstream[0])
        if cats.bucket:
            finite_tail = lse_tail.masked_fill(torch.isneginf(lse_tail), 0.0)
            grad = (z_tail - finite_tail[:, None]).exp_().mul_(grad_cat[:, k:])
        else:
            grad = torch.zeros_like(z)
        return outs, grad.scatter_add_(1, column, torch.where(inside, grad_cat[:, :k], 0.0))


class ShardedLogProbs:
    """Per-token log-probs (and entropy) on a shard (outputs as ``backends.row_math.LogProbRows``).

    Gradients: ``d log q(y)/dz = onehot(y) - q`` and ``dH/dz = -q (log q + H)``, with the whole row's
    log-sum-exp and entropy.
    """

    def __init__(self, token_ids: torch.Tensor, entropy: bool) -> None:
        self.token_ids, self.entropy = token_ids, entropy
        self.output_names = logprob_outputs(entropy)
        self.n_differentiable = len(self.output_names)

    def __call__(self, z: torch.Tensor, rows: slice, upstream: Upstream | None, shard: VocabShard,
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        y, v0 = self.token_ids[rows], shard.offset
        inside = (y >= v0) & (y < v0 + z.shape[1])
        column = torch.where(inside, y - v0, 0)[:, None]
        lse_r = torch.logsumexp(z, -1)
        local = [lse_r, torch.where(inside, z.gather(1, column)[:, 0], 0.0)]
        if self.entropy:
            local.append(_shard_entropy(z, lse_r))
        gathered = _all_gather(shard, torch.stack(local))  # (world, 2|3, n)
        lse = torch.logsumexp(gathered[:, 0], 0)
        outs = [gathered[:, 1].sum(0) - lse]
        if self.entropy:
            outs.append(_combine_entropy(gathered[:, 0], gathered[:, 2], lse))
        if upstream is None:
            return outs, None
        u_lp = torch.zeros_like(lse) if upstream[0] is None else upstream[0]
        log_q = z - lse[:, None]
        q = log_q.exp()
        if self.entropy and upstream[1] is not None:
            log_q.masked_fill_(q == 0, 0.0)  # 0 log 0 = 0, and no 0 * inf below
            grad = log_q.add_(outs[1][:, None]).mul_(upstream[1][:, None]).add_(u_lp[:, None]).mul_(q).neg_()
        else:
            grad = q.mul_(-u_lp[:, None])
        return outs, grad.scatter_add_(1, column, torch.where(inside, u_lp, 0.0)[:, None])


class ShardedRowsEngine:
    """Token chunks of the shard's student logits through a sharded row kernel, as an ``Engine``."""

    def __init__(self, kernel: ShardedTopK | ShardedLogProbs, opts: LossOptions, tuning: Tuning,
                 shard: VocabShard) -> None:
        self.kernel, self.opts, self.tuning, self.shard = kernel, opts, tuning, shard
        self.output_names, self.n_differentiable = kernel.output_names, kernel.n_differentiable

    def run(self, student: Student, upstream: Upstream | None, want: Want, state: None = None) -> EngineResult:
        hs, opts, shard = student.hidden, self.opts, self.shard
        n, spec, t, width = hs.shape[0], opts.student, opts.temperature, shard.compared(opts.vocab_size)
        head = Head(student.weight, student.bias, spec.scale)
        sink = GradSink(hs, head, want, self.tuning) if upstream is not None else None
        if upstream is not None and head.scale != 1.0:
            upstream = [None if u is None else u * head.scale for u in upstream]  # the sink takes dL/d(h W^T + b)
        outs = [torch.zeros(n, dtype=accum_dtype(hs.dtype), device=hs.device) for _ in self.output_names]
        chunk = _chunk_tokens(n, shard, opts.vocab_size, self.tuning, hs.dtype)
        buffer = torch.empty(chunk * width, dtype=hs.dtype, device=hs.device)
        for i0 in range(0, n, chunk):
            rows = slice(i0, min(i0 + chunk, n))
            z = finish_logits(head.logits(hs[rows], 0, width, buffer), spec, t)
            chunk_up = None if upstream is None else [None if u is None else u[rows] for u in upstream]
            values, grad = self.kernel(z, rows, chunk_up, shard)
            for out, value in zip(outs, values, strict=True):
                out[rows] = value
            if grad is not None and sink is not None:
                sink.add(logits_grad_to_raw(grad, z, spec, t), hs[rows], rows, 0)
        return EngineResult(tuple(outs), _complete(shard, sink))


def sharded_engine(call: LossCall, tokens: TokenRows, labels: torch.Tensor | None = None) -> Engine:
    """The vocabulary-parallel engine for ``call`` (``call.shard`` set) on its counted rows."""
    opts, teacher, shard = call.options, call.teacher, call.shard
    assert shard is not None
    if isinstance(teacher, TeacherHead):
        head = teacher.head
        rows = Student(tokens.take(head.hidden).contiguous(), head.weight.contiguous(),
                       None if head.bias is None else head.bias.contiguous())
        return ShardedHeadsEngine(rows, opts, call.tuning, labels, shard)
    if isinstance(teacher, TopKTeacher):
        log_p = tokens.take(teacher.logprobs).to(accum_dtype(call.student.hidden.dtype))
        categories = TopKCategories(tokens.take(teacher.ids).long(), log_p, opts, teacher.tail)
        return ShardedRowsEngine(ShardedTopK(categories, call.return_stats), opts, call.tuning, shard)
    assert isinstance(teacher, SampledTokens)
    kernel = ShardedLogProbs(tokens.take(teacher.ids).long(), call.return_stats)
    return ShardedRowsEngine(kernel, opts, call.tuning, shard)


def shard_rows(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's contiguous row shard of a whole head weight ``(V, H)`` or bias ``(V,)``.

    The split the losses expect: rank ``r`` of ``group`` gets the ``r``-th of ``world`` slices in
    order, their sizes differing by at most one (``torch.tensor_split``). A view, not a copy.
    """
    return t.tensor_split(dist.get_world_size(group))[dist.get_rank(group)]
