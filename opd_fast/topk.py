"""Distillation from a teacher that only returns its top-k log-probs (e.g. a served teacher).

The student side needs its full-vocabulary log-sum-exp and the logits of the k teacher ids,
so each token chunk still gets a ``chunk x V`` logits tile (never ``N x V``); the divergence
itself lives on ``k`` (or ``k + 1``) categories per token and is computed by ``tile_math``'s
divergence formulas on those categories.

Categories and gradient. The categories are a softmax over *category logits*: the k gathered
student logits and, with ``tail="bucket"``, the log-sum-exp of every other logit (the tail).
``tile_math`` gives the gradient with respect to the category logits (``a - q c``); the chain
rule back to the vocabulary is the identity on the k ids and ``exp(z_v - lse_tail)`` on the
tail, so the gradient tile is one exp pass plus a k-sparse scatter.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import resolve
from .backends.chunked import Tuning
from .backends.gathered import GatheredRows
from .backends.rows import FusedRows, RowSetup, Upstream
from .backends.tile_math import RowTerms, accum_dtype, grad_from_terms, tile_terms
from .compaction import TokenRows
from .validation import (
    TOPK_PAD_ID,
    LossOptions,
    validate_topk_call,
    validate_topk_values,
)

__all__ = ["fused_linear_kl_topk"]

Stats = dict[str, torch.Tensor]
_NEG_INF = float("-inf")


class _TopKRows:
    """Row kernel: divergence over the top-k categories, student LSE, top-k mass (and entropy) per row.

    Padding slots point at a real id of their row (or 0 in an all-padding row) so that every
    gather/scatter is in range; their category is -inf on both sides, so they add no value and
    no gradient.
    """

    n_differentiable = 1

    def __init__(
        self, ids: torch.Tensor, logprobs: torch.Tensor, opts: LossOptions, tail: str, entropy: bool
    ) -> None:
        self.entropy = entropy
        self.n_outputs = 4 if entropy else 3
        self.valid = ids != TOPK_PAD_ID
        self.any_valid = self.valid.any(-1, keepdim=True)
        self.ids = torch.where(self.valid, ids, ids.amax(-1, keepdim=True).clamp_min(0))
        self.opts, self.bucket = opts, tail == "bucket"
        log_p = logprobs.to(accum_dtype(logprobs.dtype)).clamp_max(0.0).masked_fill(~self.valid, _NEG_INF)
        top_mass = torch.logsumexp(log_p, -1)
        self.teacher_topk_mass = top_mass.exp()
        if self.bucket:
            tail_mass = torch.expm1(top_mass.clamp_max(0.0)).neg_().clamp_min_(reference.TOPK_TAIL_FLOOR)
            has_tail = self.valid.sum(-1) < opts.vocab_size
            log_p = torch.cat([log_p, tail_mass.log_().masked_fill_(~has_tail, _NEG_INF)[:, None]], 1)
        # Normalize over the categories (renormalize; a no-op for a consistent bucket), 0 log 0 kept.
        self.log_p = (log_p - torch.logsumexp(log_p, -1, keepdim=True)).masked_fill_(torch.isneginf(log_p), _NEG_INF)

    def __call__(
        self, z: torch.Tensor, rows: slice, upstream: Upstream | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        ids, valid = self.ids[rows], self.valid[rows]
        z_ids = z.gather(1, ids)
        top = z_ids.masked_fill(~valid, _NEG_INF)
        lse_top = torch.logsumexp(top, -1)
        if self.bucket:
            # The tail's log-sum-exp, exactly: hide the top-k ids, reduce, put them back below.
            z.scatter_(1, ids, torch.where(self.any_valid[rows], _NEG_INF, z_ids))
            lse_tail = torch.logsumexp(z, -1)
            lse = torch.logaddexp(lse_tail, lse_top)
        else:
            lse_tail, lse = None, torch.logsumexp(z, -1)
        terms, a, q = self.category_terms(top, lse_top, lse_tail, lse, rows)
        outs = [terms.divergence, lse, (lse_top - lse).exp()]
        if upstream is None or upstream[0] is None:
            if self.bucket:
                z.scatter_(1, ids, z_ids)
            return self._with_entropy(outs, z, lse), None
        grad_cat = grad_from_terms(a, q, terms.coef, upstream[0])
        k = ids.shape[1]
        if self.bucket:
            finite_tail = lse_tail.masked_fill(torch.isneginf(lse_tail), 0.0)
            grad = (z - finite_tail[:, None]).exp_().mul_(grad_cat[:, k:])  # 0 on the hidden top-k ids
            z.scatter_(1, ids, z_ids)
        else:
            grad = torch.zeros_like(z)
        return self._with_entropy(outs, z, lse), grad.scatter_add_(1, ids, grad_cat[:, :k])

    def category_terms(
        self, top: torch.Tensor, lse_top: torch.Tensor, lse_tail: torch.Tensor | None, lse: torch.Tensor,
        rows: slice = slice(None),
    ) -> tuple[RowTerms, torch.Tensor, torch.Tensor]:  # fmt: skip
        """``tile_terms`` on the categories of ``rows`` from the student's k id logits ``top`` (-inf on
        padding), their log-sum-exp, the tail's (bucket only) and the full row's ``lse``."""
        if self.bucket:
            log_q = torch.cat([top, lse_tail[:, None]], 1).sub_(lse[:, None])
        else:
            log_q = (top - lse_top[:, None]).masked_fill_(~self.valid[rows], _NEG_INF)
        zero = lse.new_zeros(lse.shape)
        return tile_terms(log_q, self.log_p[rows], zero, zero, self.opts)

    def _with_entropy(self, outs: list[torch.Tensor], z: torch.Tensor, lse: torch.Tensor) -> list[torch.Tensor]:
        """Append the student's full-vocabulary entropy when asked (one more pass over the tile)."""
        if self.entropy:
            outs.append(torch.special.entr((z - lse[:, None]).exp_()).sum(-1))
        return outs


def fused_linear_kl_topk(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    temperature_sq_scaling: bool = False,
    tail: str = "bucket",
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: float | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    vocab_size: int | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    tuning: Tuning | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """Divergence between a teacher's top-k log-probs and the student, from hidden states, fused.

    Per token the teacher gives ``k`` ids and their log-probs; the student's distribution is its
    full softmax (``softcap(scale (h W^T + b)) / temperature``, the contract's head). Both are
    compared on categories:

    * ``tail="bucket"`` (default): the k ids plus one *tail* category holding all other mass:
      the student's ``1 - sum_k q`` (from the exact log-sum-exp of the other logits) and the
      teacher's ``1 - sum_k exp(logprob)``, clamped below at ``reference.TOPK_TAIL_FLOOR``
      (served log-probs are rounded; an exactly-zero tail would make reverse KL infinite).
      When the ids cover the whole vocabulary there is no tail. If rounding makes the teacher's
      categories sum above one they are normalized.
    * ``tail="renormalize"``: both distributions renormalized over the k ids. The loss then
      depends on the k id logits only, so without ``return_stats`` every backend computes just
      those (``backends/gathered.py``: ``n x k x H`` sparse products instead of a vocabulary
      sweep); the stats (full log-sum-exp, entropy, top-k mass) need the sweep.

    Reverse KL over a truncated support: with ``"renormalize"`` the objective only sees the
    student's *shape* on the top-k, not how much mass it puts there, so nothing stops mass from
    drifting onto tokens outside the teacher's top-k. With reverse KL (and JSD near beta=1),
    mode-seeking and trained on the student's own samples, that drift feeds itself: the student
    samples the outside tokens more, and there the teacher gives no signal at all. It is
    unstable when k is small or the teacher is flat (top-k mass far from one). The bucket
    closes the hole: mass moved outside the top-k lands in the tail category, which the teacher
    scores with its small tail mass, so reverse KL penalizes it like any other mismatch. Forward
    KL with the bucket also pulls the student's tail mass toward the teacher's.

    Temperature: divides the *student's* logits only. The teacher's log-probs are used as given,
    i.e. they must already be at the temperature you want to match (for ``"renormalize"``,
    re-tempering yourself as ``log_softmax(logprobs / T)`` over the k ids is equivalent; a tail
    cannot be re-tempered without the teacher's logits). ``temperature_sq_scaling`` multiplies
    the loss by T^2.

    Args:
        student_hidden: ``(..., H)``; gets a gradient, as do ``student_weight`` ``(V, H)`` and
            ``student_bias`` ``(V,)``.
        teacher_topk_ids: integer ``(..., k)``, ``k >= 1``, distinct ids in ``[0, V)`` per token;
            ``-1`` marks a padding slot (ignored along with its log-prob), so tokens may carry
            fewer than k entries. A token whose slots are all padding has divergence 0.
        teacher_topk_logprobs: ``(..., k)`` float log-probs <= 0 (values up to
            ``validation.logprob_tolerance`` above 0 are rounding and are clamped); ``-inf`` is a
            zero probability. Constants: never differentiated.
        divergence: ``"forward_kl"`` | ``"reverse_kl"`` | ``"jsd"`` (``beta``: 0 = forward KL,
            1 = reverse KL, exactly) | ``"tvd"``, on the categories.
        mask, token_weights, reduction, num_items: as ``fused_linear_kl``. The teacher entries
            of masked tokens are never read (not even validated).
        vocab_size: compare only the first K student logits (padded heads); ids must be < K.
        backend: ``"auto"``/``"torch"`` (token-chunked torch), ``"cpu"`` (the same chunks, per-row
            math in the native kernel: ``backends/cpu_rows.py``), ``"triton"`` (CUDA; fused kernels,
            no ``chunk x V`` tensor: ``backends/triton_rows.py``) or ``"reference"`` (float64,
            materialized).
        return_stats: also return detached per-token ``divergence``, ``student_lse``,
            ``student_entropy`` (full vocabulary), ``student_topk_mass`` and ``teacher_topk_mass``
            (leading shape, 0 where masked).
        tuning: chunk size / memory budget (``Tuning.chunk_vocab`` is not used: rows are whole).

    Returns:
        The loss (fp32, float64 for float64 inputs; per token for ``reduction="none"``), and the
        stats when asked.
    """
    name = resolve(backend, student_hidden.device)
    if name == "reference":
        return reference.fused_linear_kl_topk(
            student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs,
            divergence=divergence, beta=beta, temperature=temperature, temperature_sq_scaling=temperature_sq_scaling,
            tail=tail, mask=mask, token_weights=token_weights, reduction=reduction, num_items=num_items,
            student_bias=student_bias, student_logit_scale=student_logit_scale, student_softcap=student_softcap,
            vocab_size=vocab_size, return_stats=return_stats,
        )  # fmt: skip
    opts, mask, token_weights = validate_topk_call(
        student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs,
        divergence=divergence, beta=beta, temperature=temperature, temperature_sq_scaling=temperature_sq_scaling,
        tail=tail, mask=mask, token_weights=token_weights, reduction=reduction, num_items=num_items,
        student_bias=student_bias, student_logit_scale=student_logit_scale, student_softcap=student_softcap,
        vocab_size=vocab_size,
    )  # fmt: skip
    tokens = TokenRows.build(
        tuple(student_hidden.shape[:-1]), student_hidden.dtype, student_hidden.device, mask, token_weights
    )
    hs, ids, log_p = (tokens.take(t) for t in (student_hidden, teacher_topk_ids, teacher_topk_logprobs.detach()))
    validate_topk_values(ids, log_p, opts.vocab_size, tail)
    # the category math runs in the student's accumulation dtype, whatever the teacher's log-probs dtype
    kernel = _TopKRows(ids.long(), log_p.to(accum_dtype(hs.dtype)), opts, tail, entropy=return_stats)
    setup = RowSetup(opts.student, opts.temperature, opts.vocab_size, tuning or Tuning())
    operands = (
        hs.contiguous(), student_weight.contiguous(), None if student_bias is None else student_bias.contiguous()
    )
    row_weights = tokens.coefficients(opts)
    fused, rows = FusedRows, kernel
    if tail == "renormalize" and not return_stats:  # only the k id logits matter, on any backend
        fused = GatheredRows
    elif name == "triton":
        from .backends.triton_rows import TopKMath, TritonRows

        fused, rows = TritonRows, TopKMath(kernel)
    elif name == "cpu":
        from .backends.cpu_rows import NativeTopKRows

        rows = NativeTopKRows(kernel, opts)
    if opts.reduction == "none":
        div, *per_row = fused.apply(*operands, rows, setup, None)
        value = div * row_weights
    else:
        value, div, *per_row = fused.apply(*operands, rows, setup, row_weights)

    loss = tokens.expand(value) if opts.reduction == "none" else value
    if not return_stats:
        return loss
    lse, top_mass, entropy = per_row
    stats = {
        "divergence": div.detach(),
        "student_lse": lse,
        "student_entropy": entropy,
        "student_topk_mass": top_mass,
        "teacher_topk_mass": kernel.teacher_topk_mass.to(lse.dtype),
    }
    return loss, {name: tokens.expand(v) for name, v in stats.items()}
