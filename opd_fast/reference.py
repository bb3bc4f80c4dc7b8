"""The math contract, written once, in float64, unfused and readable.

This module *is* the specification of the math: it materializes the full logits on purpose
and lets autograd produce the gradients. Every backend is tested against it. It shares only
the validated call description (``core.call.LossCall``) with the fast paths; compaction, the
math and the reduction are written here independently so that a bug in a backend cannot hide
in a helper both sides call. ``evaluate(call)`` is what ``backend="reference"`` runs; the
three functions named like the public ones are those with ``backend="reference"``.

Per token, for each side: ``z = softcap(scale * (h @ W[:K]^T + b[:K])) / T`` with
``softcap(x) = c * tanh(x / c)``; ``q = softmax(z_student)``, ``p = softmax(z_teacher)``.

=============  ==============================================  ===========================
divergence     per-token value                                 note
=============  ==============================================  ===========================
forward_kl     sum p (log p - log q)                           mass-covering
reverse_kl     sum q (log q - log p)                           mode-seeking
jsd            beta KL(p||M) + (1-beta) KL(q||M),               beta=0 is forward_kl and
               M = beta p + (1-beta) q                          beta=1 reverse_kl exactly
tvd            0.5 sum |p - q|                                 bounded in [0, 1]
=============  ==============================================  ===========================

Hard labels (``labels``, ``hard_weight``): the cross-entropy of the student on ground-truth
tokens, ``CE = logsumexp(y) - y[label]`` on the student's logits at temperature 1
(``y = softcap(scale * (h @ W[:K]^T + b[:K]))``: temperature is a distillation device and the
T^2 rescaling belongs to the soft part only), is added as ``loss = soft + hard_weight * hard``
where ``hard`` is reduced like the divergence over the counted tokens whose label is not
``ignore_index`` ("mean" divides by those tokens' weight sum, or ``num_items``).

Reductions: with per-token weights ``w = token_weights * mask`` (each defaulting to 1),
``"sum"`` is ``sum w d``, ``"mean"`` is ``sum w d / (num_items or sum w)`` and ``"none"``
returns ``w d`` per token (0 where masked). ``temperature_sq_scaling`` multiplies by T^2.
An all-masked batch gives 0 (never NaN) and zero gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .core.call import (
    TOPK_PAD_ID,
    TOPK_TAIL_FLOOR,
    Head,
    HeadSpec,
    LossCall,
    LossOptions,
    SampledTokens,
    TeacherHead,
    TopKTeacher,
)

__all__ = [
    "TOPK_TAIL_FLOOR",
    "divergence_from_logits",
    "evaluate",
    "fused_linear_kl",
    "fused_linear_kl_topk",
    "fused_linear_logprobs",
    "head_logits",
    "topk_divergence_from_logits",
]


def head_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: HeadSpec,
    temperature: float,
    vocab_size: int,
) -> torch.Tensor:
    """Float64 logits of one head over the first ``vocab_size`` entries."""
    z = hidden.double() @ weight[:vocab_size].double().T
    if bias is not None:
        z = z + bias[:vocab_size].double()
    z = z * spec.scale
    if spec.softcap is not None:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    return z / temperature


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities; 0 log 0 = 0, -inf logits are legal.

    The difference is masked *before* the product so autograd never sees 0 * nan; only an
    exact zero is masked, so a NaN probability (a non-finite input) reaches the value and the
    gradient.
    """
    a = log_a.exp()
    diff = torch.where(a == 0, torch.zeros_like(a), log_a - log_b)
    return (a * diff).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta p + (1-beta) q), -inf where both are zero (with finite gradients)."""
    both_zero = (log_p == float("-inf")) & (log_q == float("-inf"))
    zero = torch.zeros_like(log_p)
    stacked = torch.stack(
        [torch.where(both_zero, zero, log_p) + math.log(beta), torch.where(both_zero, zero, log_q) + math.log1p(-beta)]
    )
    return torch.where(both_zero, torch.full_like(log_p, float("-inf")), torch.logsumexp(stacked, dim=0))


def divergence_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str, beta: float = 0.5
) -> torch.Tensor:
    """Per-row divergence between softmax(teacher) = p and softmax(student) = q."""
    log_q = torch.log_softmax(student_logits, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if divergence == "tvd":
        # |d| as d sign(d) with sign(NaN) = NaN: abs's gradient, sign(d), is 0 at NaN in torch,
        # which would hide a non-finite input from the gradient
        diff = log_p.exp() - log_q.exp()
        sign = torch.where(diff.isnan(), diff, diff.sign()).detach()
        return 0.5 * (diff * sign).sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def evaluate(call: LossCall) -> Any:
    """The float64 result of a validated call: what the public function returns for it."""
    if isinstance(call.teacher, TeacherHead):
        return _teacher_head_loss(call, call.teacher.head)
    if isinstance(call.teacher, TopKTeacher):
        return _topk_loss(call, call.teacher)
    return _logprob_loss(call, call.teacher)


def fused_linear_kl(*args: Any, **kwargs: Any) -> Any:
    """``opd_fast.fused_linear_kl(..., backend="reference")`` (same arguments)."""
    from .loss import fused_linear_kl

    return fused_linear_kl(*args, **kwargs, backend="reference")


def fused_linear_kl_topk(*args: Any, **kwargs: Any) -> Any:
    """``opd_fast.fused_linear_kl_topk(..., backend="reference")`` (same arguments)."""
    from .topk import fused_linear_kl_topk

    return fused_linear_kl_topk(*args, **kwargs, backend="reference")


def fused_linear_logprobs(*args: Any, **kwargs: Any) -> Any:
    """``opd_fast.fused_linear_logprobs(..., backend="reference")`` (same arguments)."""
    from .logprobs import fused_linear_logprobs

    return fused_linear_logprobs(*args, **kwargs, backend="reference")


def _teacher_head_loss(call: LossCall, teacher: Head) -> Any:
    """Teacher-student divergence with its hard-label term; gradients through autograd."""
    opts, mask, token_weights, return_stats = call.options, call.mask, call.token_weights, call.return_stats
    student_hidden, student_weight, student_bias = call.student.hidden, call.student.weight, call.student.bias
    teacher_hidden, teacher_weight, teacher_bias = teacher.hidden, teacher.weight, teacher.bias
    labels = None if call.hard is None else call.hard.labels
    leading = student_hidden.shape[:-1]
    k, t = opts.vocab_size, opts.temperature
    counted = torch.ones(leading, dtype=torch.bool, device=student_hidden.device) if mask is None else mask
    # Masked rows are dropped before any math, as the backends do, so a masked row whose
    # logits are garbage (NaN, all -inf) cannot poison the result or its gradient; their hidden
    # states are zeroed before the GEMM too, or a NaN there would reach the weight gradient as 0 * NaN.
    student_hidden = _counted_only(student_hidden, counted)
    z_s = head_logits(student_hidden, student_weight, student_bias, opts.student, t, k)
    with torch.no_grad():
        z_t = head_logits(_counted_only(teacher_hidden, counted), teacher_weight, teacher_bias, opts.teacher, t, k)

    per_token = torch.zeros(leading, dtype=torch.float64, device=z_s.device)
    per_token = per_token.masked_scatter(
        counted, divergence_from_logits(z_s[counted], z_t[counted], opts.divergence, opts.beta)
    )
    weights = counted.double() if token_weights is None else token_weights.double() * counted
    loss = soft = _reduce(weights * per_token * opts.loss_scale, weights, opts)
    if labels is not None:
        labeled = counted & (labels != call.hard.ignore_index)
        y = head_logits(student_hidden, student_weight, student_bias, opts.student, 1.0, k)[labeled]
        ce = torch.zeros(leading, dtype=torch.float64, device=z_s.device)
        ce = ce.masked_scatter(labeled, torch.logsumexp(y, -1) - y.gather(-1, labels[labeled].long()[:, None])[:, 0])
        hard = _reduce(weights * labeled * ce, weights * labeled, opts)
        loss = soft + opts.hard_weight * hard

    if not return_stats:
        return loss
    with torch.no_grad():
        log_q = torch.log_softmax(z_s, -1)
        q = log_q.exp()
        entropy = -torch.where(q == 0, torch.zeros_like(q), q * log_q).sum(-1)  # a NaN row stays NaN
        zero = torch.zeros((), dtype=torch.float64, device=z_s.device)
        # Stats are 0 on masked tokens: the backends never compute those rows.
        stats = {
            "divergence": per_token.detach(),
            "student_lse": torch.where(counted, torch.logsumexp(z_s, -1), zero).detach(),
            "teacher_lse": torch.where(counted, torch.logsumexp(z_t, -1), zero),
            "student_entropy": torch.where(counted, entropy, zero).detach(),
        }
        if labels is not None:
            stats.update(cross_entropy=ce.detach(), soft_loss=soft.detach(), hard_loss=hard.detach())
    return loss, stats


def _counted_only(hidden: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """``hidden`` with the rows of uncounted tokens zeroed (differentiable: they get zero gradient)."""
    return hidden.masked_fill(~counted[..., None], 0.0)


def _reduce(weighted: torch.Tensor, weights: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """The contract's reduction of per-token ``weighted`` values whose token weights are ``weights``."""
    if opts.reduction == "none":
        return weighted
    if opts.reduction == "sum":
        return weighted.sum()
    denom = opts.num_items if opts.num_items is not None else weights.sum()
    return weighted.sum() / denom if opts.num_items is not None or weights.sum() > 0 else weighted.sum()


# ---- teachers that return top-k log-probs ------------------------------------------------------



def topk_divergence_from_logits(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    divergence: str,
    beta: float = 0.5,
    tail: str = "bucket",
) -> torch.Tensor:
    """Per-row divergence between a teacher's top-k log-probs and the student's full logits.

    Rows are ``(n, V)`` logits and ``(n, k)`` ids / log-probs. Padding slots (id -1) are dropped.
    The compared distributions are over categories: the row's top-k ids, plus with
    ``tail="bucket"`` one category for everything else (the student's mass there, and the
    teacher's ``max(1 - sum exp(logprobs), TOPK_TAIL_FLOOR)``; no bucket when the ids cover the
    whole vocabulary). Both sides are then normalized over their categories, which is what
    ``tail="renormalize"`` means and a no-op for a consistent bucket. A row with no category
    left has divergence 0.
    """
    log_q = torch.log_softmax(student_logits.double(), -1)
    vocab = log_q.shape[-1]
    values = []
    for row_z, row_q, row_ids, row_lp in zip(student_logits, log_q, teacher_topk_ids, teacher_topk_logprobs,
                                             strict=True):
        keep = row_ids != TOPK_PAD_ID
        row_ids, log_p = row_ids[keep].long(), row_lp[keep].double().clamp_max(0.0)
        # renormalized, the value depends on the ids' logits only, so a NaN logit elsewhere in the
        # row must not reach it (the k-sparse backends never compute those logits)
        student = row_q[row_ids] if tail == "bucket" else row_z.double()[row_ids]
        if tail == "bucket" and row_ids.numel() < vocab:
            outside = torch.ones(vocab, dtype=torch.bool, device=row_q.device)
            outside[row_ids] = False
            student = torch.cat([student, torch.logsumexp(row_q[outside], 0)[None]])
            tail_mass = (1.0 - log_p.exp().sum()).clamp_min(TOPK_TAIL_FLOOR)
            log_p = torch.cat([log_p, tail_mass.log()[None]])
        if student.numel() == 0:
            values.append(row_q.new_zeros(()))
            continue
        values.append(divergence_from_logits(student[None], log_p[None], divergence, beta)[0])
    return torch.stack(values) if values else log_q[:, :0].sum(-1)  # no rows: still on the graph (zero grads)


def _topk_loss(call: LossCall, teacher: TopKTeacher) -> Any:
    """Top-k divergence; ``temperature`` divides the student's logits only (the log-probs are as given)."""
    opts, mask, token_weights, return_stats = call.options, call.mask, call.token_weights, call.return_stats
    student_hidden, student_weight, student_bias = call.student.hidden, call.student.weight, call.student.bias
    teacher_topk_ids, teacher_topk_logprobs, tail = teacher.ids, teacher.logprobs, teacher.tail
    leading = student_hidden.shape[:-1]
    counted = torch.ones(leading, dtype=torch.bool, device=student_hidden.device) if mask is None else mask
    student_hidden = _counted_only(student_hidden, counted)  # as in fused_linear_kl
    z = head_logits(student_hidden, student_weight, student_bias, opts.student, opts.temperature, opts.vocab_size)
    ids, log_p = teacher_topk_ids[counted], teacher_topk_logprobs.detach()[counted]
    per_token = torch.zeros(leading, dtype=torch.float64, device=z.device).masked_scatter(
        counted, topk_divergence_from_logits(z[counted], ids, log_p, opts.divergence, opts.beta, tail)
    )
    weights = counted.double() if token_weights is None else token_weights.double() * counted
    loss = _reduce(weights * per_token * opts.loss_scale, weights, opts)
    if not return_stats:
        return loss
    with torch.no_grad():
        keep = ids != TOPK_PAD_ID
        log_q = torch.log_softmax(z[counted], -1)
        rows = {
            "divergence": per_token[counted],
            "student_lse": torch.logsumexp(z[counted], -1),
            "student_entropy": -(log_q.exp() * torch.where(log_q > float("-inf"), log_q, 0.0)).sum(-1),
            "student_topk_mass": torch.where(keep, log_q.gather(-1, ids.clamp_min(0).long()).exp(), 0.0).sum(-1),
            "teacher_topk_mass": torch.where(keep, log_p.double().clamp_max(0.0).exp(), 0.0).sum(-1),
        }
        zeros = torch.zeros(leading, dtype=torch.float64, device=z.device)
        stats = {name: zeros.masked_scatter(counted, value) for name, value in rows.items()}
    return loss, stats


def _logprob_loss(call: LossCall, tokens: SampledTokens) -> Any:
    """Per-token ``log softmax(z)[token]`` (and the entropy of ``softmax(z)``)."""
    hidden, weight, bias, spec = call.student.hidden, call.student.weight, call.student.bias, call.options.student
    temperature, token_ids, return_entropy = call.options.temperature, tokens.ids, call.return_stats
    log_q = torch.log_softmax(head_logits(hidden, weight, bias, spec, temperature, weight.shape[0]), -1)
    logprobs = log_q.gather(-1, token_ids.long()[..., None]).squeeze(-1)
    if not return_entropy:
        return logprobs
    finite = torch.where(log_q == float("-inf"), torch.zeros_like(log_q), log_q)  # NaN passes, as in _kl
    return logprobs, -(log_q.exp() * finite).sum(-1)
