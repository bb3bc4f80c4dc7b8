"""Public fused divergence loss: validation, compaction, reduction, dispatch.

The backends see only compacted 2-D rows and a per-row coefficient; everything about the
call's shape, masks, weights and reduction is decided here, once.
"""

from __future__ import annotations

import torch
from torch import nn

from . import reference
from .backends import Tuning, resolve, runner
from .compaction import TokenRows
from .validation import validate_kl_call

__all__ = ["FusedLinearKL", "fused_linear_kl"]

Stats = dict[str, torch.Tensor]


def fused_linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    temperature_sq_scaling: bool = False,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: float | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
    labels: torch.Tensor | None = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    backend: str = "auto",
    return_stats: bool = False,
    tuning: Tuning | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """Teacher-student divergence per token, from hidden states and LM heads, fused.

    Computes ``divergence(softmax(teacher logits) || softmax(student logits))`` over the whole
    (or the first ``vocab_size``) vocabulary without holding an ``N x V`` logits tensor. The math
    is ``opd_fast.reference``'s (DESIGN.md "Math conventions").

    Args:
        student_hidden: ``(..., H_s)``; gets a gradient, as do ``student_weight`` ``(V, H_s)``
            and ``student_bias`` ``(V,)``.
        teacher_hidden: ``(..., H_t)``, same leading shape; teacher tensors are constants:
            they are detached even if they require grad, and get no gradient.
        divergence: ``"forward_kl"`` | ``"reverse_kl"`` | ``"jsd"`` (``beta`` in [0, 1]:
            0 is forward KL, 1 reverse KL, exactly) | ``"tvd"``.
        temperature: divides the logits after scale and softcap; ``temperature_sq_scaling``
            multiplies the loss by T^2.
        mask: bool, leading shape, True = counts; masked tokens are dropped before any GEMM.
        token_weights: float, leading shape.
        reduction: ``"mean"`` (weighted sum / sum of counted weights, or / ``num_items`` for
            gradient accumulation and data parallelism), ``"sum"``, or ``"none"`` (leading
            shape, weighted per-token values, 0 where masked).
        labels, hard_weight, ignore_index: hard-label mixing. ``labels`` (integer, leading shape,
            values in ``[0, K)`` or ``ignore_index``) adds ``hard_weight`` times the student's
            cross-entropy on them, computed in the same sweep over the vocabulary: the loss is
            ``soft + hard_weight * hard`` where ``hard`` is the cross-entropy of the student's
            logits at temperature 1 (temperature and ``temperature_sq_scaling`` shape the soft
            part only), reduced like the divergence over the counted tokens whose label is not
            ``ignore_index`` (``"mean"`` averages over those, or divides by ``num_items``).
        backend: ``"auto"`` (Triton on CUDA, native kernel on CPU when built, else torch),
            ``"torch"``, ``"cpu"``, ``"triton"``, ``"reference"``.
        return_stats: also return detached per-token ``divergence``, ``student_lse``,
            ``teacher_lse`` and ``student_entropy`` (leading shape, 0 where masked); with
            ``labels`` also ``cross_entropy`` (per token, 0 where masked or ignored) and the two
            parts of the loss, ``soft_loss`` and ``hard_loss``, reduced like the loss
            (``loss = soft_loss + hard_weight * hard_loss``).
        tuning: chunk sizes / memory budget / gradient filtering of the chunked backends.

    Returns:
        The loss (fp32, float64 for float64 inputs; per token for ``reduction="none"``), and the stats when asked.
    """
    heads = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    options = dict(
        divergence=divergence, beta=beta, temperature=temperature, temperature_sq_scaling=temperature_sq_scaling,
        mask=mask, token_weights=token_weights, reduction=reduction, num_items=num_items,
        student_bias=student_bias, teacher_bias=teacher_bias, student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        vocab_size=vocab_size, labels=labels, hard_weight=hard_weight, ignore_index=ignore_index,
    )  # fmt: skip
    if backend == "reference":
        return reference.fused_linear_kl(*heads, **options, return_stats=return_stats)
    opts, mask, token_weights = validate_kl_call(*heads, **options)
    run = runner(resolve(backend, student_hidden.device))
    tokens = TokenRows.build(
        tuple(student_hidden.shape[:-1]), student_hidden.dtype, student_hidden.device, mask, token_weights
    )
    hard = None if labels is None else tokens.labels(labels, ignore_index, opts)
    row_weights = tokens.coefficients(opts)
    value, *stat_values = run(
        tokens.take(student_hidden).contiguous(), student_weight.contiguous(),
        None if student_bias is None else student_bias.contiguous(),
        tokens.take(teacher_hidden.detach()).contiguous(), teacher_weight.detach().contiguous(),
        None if teacher_bias is None else teacher_bias.detach().contiguous(),
        row_weights, opts, tuning or Tuning(), opts.reduction != "none",
        None if hard is None else hard._replace(scale=hard.scale * opts.hard_weight),
    )  # fmt: skip

    loss = tokens.expand(value) if opts.reduction == "none" else value
    if not return_stats:
        return loss
    names = ("divergence", "student_lse", "teacher_lse", "student_entropy", "cross_entropy")
    stats = {name: tokens.expand(v) for name, v in zip(names, stat_values, strict=True)}
    if hard is None:
        del stats["cross_entropy"]
        return loss, stats
    divergence, *_, ce = stat_values
    for name, part in (("soft_loss", divergence * row_weights), ("hard_loss", ce * hard.scale)):
        stats[name] = tokens.expand(part) if opts.reduction == "none" else part.sum()
    return loss, stats


class FusedLinearKL(nn.Module):
    """``fused_linear_kl`` with its options held: ``loss = FusedLinearKL(...)(h_s, W_s, h_t, W_t)``."""

    def __init__(self, **options) -> None:
        super().__init__()
        # Validate option names eagerly so a typo fails at construction, not mid-training.
        allowed = set(fused_linear_kl.__kwdefaults__)
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"FusedLinearKL got unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        self.options = options

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        **overrides,
    ) -> torch.Tensor | tuple[torch.Tensor, Stats]:
        return fused_linear_kl(
            student_hidden, student_weight, teacher_hidden, teacher_weight, **{**self.options, **overrides}
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
