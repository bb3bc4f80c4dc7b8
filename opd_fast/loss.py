"""The public fused divergence loss between a student head and a teacher head.

The function describes its call (``core.validation.kl_call``) and hands it to the loss core
(``core.run.divergence_loss``): compaction, dispatch and the autograd Function live there, once, for
every loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .core import run
from .core.call import Tuning
from .core.validation import kl_call

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

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
    teacher_lse: torch.Tensor | None = None,
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
    process_group: ProcessGroup | None = None,
) -> torch.Tensor | tuple[torch.Tensor, Stats]:
    """Teacher-student divergence per token, from hidden states and LM heads, fused.

    Computes ``divergence(softmax(teacher logits) || softmax(student logits))`` over the whole
    (or the first ``vocab_size``) vocabulary without holding an ``N x V`` logits tensor. The math
    is ``opd_fast.reference``'s.

    Args:
        student_hidden: ``(..., H_s)``; gets a gradient, as do ``student_weight`` ``(V, H_s)``
            and ``student_bias`` ``(V,)``.
        teacher_hidden: ``(..., H_t)``, same leading shape; teacher tensors are constants:
            they are detached even if they require grad, and get no gradient.
        teacher_lse: the teacher's per-token log-sum-exp (leading shape, finite on counted
            tokens), as ``return_stats`` returns it for the same teacher tensors and options. A
            frozen teacher's does not change between optimizer steps on one rollout batch, so
            passing it back lets a backend skip the teacher's statistics sweep: on Triton for JSD
            and TVD (pass 1 sweeps the student alone) and for forward KL with a scalar loss (the
            divergence is summed in the gradient pass); on the chunked torch / CPU backends when
            the vocabulary is tiled. Elsewhere (reverse KL, whose gradient coefficient is the KL
            itself; full-row chunks, which hold the teacher's logits anyway; the reference) it is
            checked and not needed. It must be the true LSE: nothing re-derives it.
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
        process_group: vocabulary parallelism (``opd_fast.distributed``): each rank of the group passes
            its contiguous row shard of both heads (rank order), the hidden states and per-token
            tensors replicated; the loss and stats equal the unsharded ones on every rank, the
            weight and bias gradients stay sharded, the hidden-state gradient is complete.

    Returns:
        The loss (fp32, float64 for float64 inputs; per token for ``reduction="none"``), and the stats when asked.
    """
    return run.divergence_loss(kl_call(locals()))


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
