"""Distillation from a teacher that only returns its top-k log-probs (e.g. a served teacher).

The student side needs its full-vocabulary log-sum-exp and the logits of the k teacher ids,
so each token chunk still gets a ``chunk x V`` logits tile (never ``N x V``); the divergence
itself lives on ``k`` (or ``k + 1``) categories per token (``backends/row_math.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .core import run
from .core.call import Tuning
from .core.validation import topk_call

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["fused_linear_kl_topk"]

Stats = dict[str, torch.Tensor]


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
    process_group: ProcessGroup | None = None,
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
            no logits tensor: ``backends/triton_rows.py``) or ``"reference"`` (float64,
            materialized).
        return_stats: also return detached per-token ``divergence``, ``student_lse``,
            ``student_entropy`` (full vocabulary), ``student_topk_mass`` and ``teacher_topk_mass``
            (leading shape, 0 where masked).
        tuning: chunk size / memory budget (``Tuning.chunk_vocab`` sets the Triton
            gradient's vocabulary stripe; the other backends keep rows whole).
        process_group: vocabulary parallelism, as ``fused_linear_kl``'s (the ids are global).

    Returns:
        The loss (fp32, float64 for float64 inputs; per token for ``reduction="none"``), and the
        stats when asked.
    """
    return run.divergence_loss(topk_call(locals()))
