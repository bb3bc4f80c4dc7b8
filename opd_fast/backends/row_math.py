"""The per-row math of the single-head losses in torch: log-probs and the top-k teacher.

``rows.sweep_rows`` hands these kernels one chunk of final student logits ``(n, V)`` at a time;
the native kernels (``cpu_rows``) replace them on fp32/bf16 tiles, the Triton path
(``triton_rows``) reuses ``TopKCategories`` on the few numbers per row its sweep leaves.

Top-k categories and gradient. The categories are a softmax over *category logits*: the k
gathered student logits and, with ``tail="bucket"``, the log-sum-exp of every other logit (the
tail). ``tile_math`` gives the gradient with respect to the category logits (``a - q c``); the
chain rule back to the vocabulary is the identity on the k ids and ``exp(z_v - lse_tail)`` on the
tail, so the gradient tile is one exp pass plus a k-sparse scatter.
"""

from __future__ import annotations

import torch

from ..core.call import TOPK_PAD_ID, TOPK_TAIL_FLOOR, LossOptions, Tail
from ..core.engine import Upstream, accum_dtype, logprob_outputs, topk_outputs
from .tile_math import RowTerms, grad_from_terms, tile_terms

__all__ = ["LogProbRows", "TopKCategories", "TopKRows"]

_NEG_INF = float("-inf")


class LogProbRows:
    """``log q(y)`` per row and optionally the entropy ``H = -sum q log q`` of ``q = softmax(z)``.

    Gradients: ``d log q(y)/dz = onehot(y) - q`` and ``dH/dz = -q (log q + H)``.
    """

    def __init__(self, token_ids: torch.Tensor, entropy: bool) -> None:
        self.token_ids = token_ids
        self.entropy = entropy
        self.output_names = logprob_outputs(entropy)
        self.n_differentiable = len(self.output_names)

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


class TopKCategories:
    """The teacher's side of the top-k categories, prepared once per call, and their divergence.

    Padding slots point at a real id of their row (or 0 in an all-padding row) so that every
    gather/scatter is in range; their category is -inf on both sides, so they add no value and
    no gradient. Rows are the counted tokens: ``ids`` ``(n, k)`` int64, ``logprobs`` in the
    student's accumulation dtype.
    """

    def __init__(self, ids: torch.Tensor, logprobs: torch.Tensor, opts: LossOptions, tail: Tail) -> None:
        self.valid = ids != TOPK_PAD_ID
        self.any_valid = self.valid.any(-1, keepdim=True)
        self.ids = torch.where(self.valid, ids, ids.amax(-1, keepdim=True).clamp_min(0))
        self.opts, self.bucket = opts, tail == "bucket"
        log_p = logprobs.to(accum_dtype(logprobs.dtype)).clamp_max(0.0).masked_fill(~self.valid, _NEG_INF)
        top_mass = torch.logsumexp(log_p, -1)
        if self.bucket:
            tail_mass = torch.expm1(top_mass.clamp_max(0.0)).neg_().clamp_min_(TOPK_TAIL_FLOOR)
            has_tail = self.valid.sum(-1) < opts.vocab_size
            log_p = torch.cat([log_p, tail_mass.log_().masked_fill_(~has_tail, _NEG_INF)[:, None]], 1)
        # Normalize over the categories (renormalize; a no-op for a consistent bucket), 0 log 0 kept.
        self.log_p = (log_p - torch.logsumexp(log_p, -1, keepdim=True)).masked_fill_(torch.isneginf(log_p), _NEG_INF)

    def category_terms(
        self, top: torch.Tensor, lse_top: torch.Tensor, lse_tail: torch.Tensor | None, lse: torch.Tensor,
        rows: slice = slice(None),
    ) -> tuple[RowTerms, torch.Tensor, torch.Tensor]:
        """``tile_terms`` on the categories of ``rows`` from the student's k id logits ``top`` (-inf on
        padding), their log-sum-exp, the tail's (bucket only) and the full row's ``lse``."""
        if self.bucket:
            log_q = torch.cat([top, lse_tail[:, None]], 1).sub_(lse[:, None])
        else:
            log_q = (top - lse_top[:, None]).masked_fill_(~self.valid[rows], _NEG_INF)
        zero = lse.new_zeros(lse.shape)
        return tile_terms(log_q, self.log_p[rows], zero, zero, self.opts)


class TopKRows:
    """Row kernel: divergence over the top-k categories, student LSE, top-k mass (and entropy) per row."""

    n_differentiable = 1

    def __init__(self, categories: TopKCategories, entropy: bool) -> None:
        self.categories, self.entropy = categories, entropy
        self.output_names = topk_outputs(entropy)

    def __call__(
        self, z: torch.Tensor, rows: slice, upstream: Upstream | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        cats = self.categories
        ids, valid = cats.ids[rows], cats.valid[rows]
        z_ids = z.gather(1, ids)
        top = z_ids.masked_fill(~valid, _NEG_INF)
        lse_top = torch.logsumexp(top, -1)
        if cats.bucket:
            # The tail's log-sum-exp, exactly: hide the top-k ids, reduce, put them back below.
            z.scatter_(1, ids, torch.where(cats.any_valid[rows], _NEG_INF, z_ids))
            lse_tail = torch.logsumexp(z, -1)
            lse = torch.logaddexp(lse_tail, lse_top)
        else:
            lse_tail, lse = None, torch.logsumexp(z, -1)
        terms, a, q = cats.category_terms(top, lse_top, lse_tail, lse, rows)
        outs = [terms.divergence, lse, (lse_top - lse).exp()]
        if upstream is None or upstream[0] is None:
            if cats.bucket:
                z.scatter_(1, ids, z_ids)
            return self._with_entropy(outs, z, lse), None
        grad_cat = grad_from_terms(a, q, terms.coef, upstream[0])
        k = ids.shape[1]
        if cats.bucket:
            finite_tail = lse_tail.masked_fill(torch.isneginf(lse_tail), 0.0)
            grad = (z - finite_tail[:, None]).exp_().mul_(grad_cat[:, k:])  # 0 on the hidden top-k ids
            z.scatter_(1, ids, z_ids)
        else:
            grad = torch.zeros_like(z)
        return self._with_entropy(outs, z, lse), grad.scatter_add_(1, ids, grad_cat[:, :k])

    def _with_entropy(self, outs: list[torch.Tensor], z: torch.Tensor, lse: torch.Tensor) -> list[torch.Tensor]:
        """Append the student's full-vocabulary entropy when asked (one more pass over the tile)."""
        if self.entropy:
            outs.append(torch.special.entr((z - lse[:, None]).exp_()).sum(-1))
        return outs


