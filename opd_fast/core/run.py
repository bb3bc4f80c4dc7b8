"""A validated call on its backend: compaction and coefficients in, the loss and its stats out.

Everything about the call's shape, masks, weights and reduction is decided here, once: the
engines see only the counted rows (``tokens``) and, for a scalar loss, each differentiable
output's per-row coefficient (``sum_i c_i D_i`` is the loss).
"""

from __future__ import annotations

import torch

from .. import reference
from .call import LossCall, TeacherHead, TopKTeacher
from .dispatch import make_engine, resolve
from .engine import Engine, FusedLoss, Student
from .tokens import TokenRows

Stats = dict[str, torch.Tensor]


def _student_rows(call: LossCall, tokens: TokenRows) -> Student:
    s = call.student
    bias = None if s.bias is None else s.bias.contiguous()
    return Student(tokens.take(s.hidden).contiguous(), s.weight.contiguous(), bias)


def _engine(call: LossCall, tokens: TokenRows, labels: torch.Tensor | None = None) -> Engine:
    """The call's engine: the vocabulary-parallel one for sharded heads, else its backend's."""
    if call.shard is not None:
        from ..distributed.vocab_parallel import sharded_engine

        return sharded_engine(call, tokens, labels)
    return make_engine(call, resolve(call.backend, call.student.hidden.device), tokens, labels)


def per_token(call: LossCall) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropy) of a ``SampledTokens`` call: per token, differentiable, no reduction."""
    if call.backend == "reference":
        return reference.evaluate(call)
    tokens = TokenRows.of(call)
    outputs = FusedLoss.apply(_engine(call, tokens), None, *_student_rows(call, tokens))
    logprobs, *entropy = (tokens.expand(out) for out in outputs)
    return (logprobs, entropy[0]) if call.return_stats else logprobs


def divergence_loss(call: LossCall) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """A divergence loss (teacher head or top-k): reduced as asked, with per-token stats when asked."""
    if call.backend == "reference":
        return reference.evaluate(call)
    opts, tokens = call.options, TokenRows.of(call)
    labels = None if call.hard is None else tokens.labels(call.hard, opts)
    engine = _engine(call, tokens, None if labels is None else labels.ids)
    weights = tokens.coefficients(opts)
    coefficients = [weights] if labels is None else [weights, labels.coefficients * opts.hard_weight]
    student = _student_rows(call, tokens)
    if opts.reduction == "none":
        outputs = FusedLoss.apply(engine, None, *student)
        value = tokens.expand(sum(c * out for c, out in zip(coefficients, outputs, strict=False)))
    else:
        value, *outputs = FusedLoss.apply(engine, coefficients, *student)
    if not call.return_stats:
        return value
    per_row = dict(zip(engine.output_names, outputs, strict=True))
    names = ["divergence", "student_lse", "student_entropy"]
    if isinstance(call.teacher, TeacherHead):
        names.insert(2, "teacher_lse")
    if isinstance(call.teacher, TopKTeacher):
        names.append("student_topk_mass")
        per_row["teacher_topk_mass"] = _teacher_topk_mass(call.teacher, tokens).to(per_row["divergence"].dtype)
        names.append("teacher_topk_mass")
    if labels is not None:
        names.append("cross_entropy")
    stats = {k: tokens.expand(per_row[k].detach()) for k in names}
    if labels is not None:
        parts = {"soft_loss": per_row["divergence"] * weights,
                 "hard_loss": per_row["cross_entropy"] * labels.coefficients}
        for k, part in parts.items():
            stats[k] = tokens.expand(part.detach()) if opts.reduction == "none" else part.detach().sum()
    return value, stats


def _teacher_topk_mass(teacher: TopKTeacher, tokens: TokenRows) -> torch.Tensor:
    """The probability mass the teacher's (non-padding) top-k entries claim, per counted row."""
    ids, log_p = tokens.take(teacher.ids), tokens.take(teacher.logprobs).double()
    return torch.logsumexp(log_p.clamp_max(0.0).masked_fill(ids < 0, float("-inf")), -1).exp()
