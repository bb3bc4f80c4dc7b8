"""Per-token log-probabilities (and entropy) straight from hidden states and an LM head.

Uses: the sampler's log-probs for importance weights, the teacher's log-probs of the sampled
tokens, and the single-sample reverse-KL estimator ``log q(y) - log p(y)``, none of which may
hold an ``N x V`` logits tensor. The per-row math is ``backends/row_math.py``'s ``LogProbRows``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .core import run
from .core.call import Tuning
from .core.validation import logprobs_call

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["fused_linear_logprobs"]


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    tuning: Tuning | None = None,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each given token under ``softmax(z)``, without materializing logits.

    ``z = softcap(logit_scale * (hidden @ weight^T + bias)) / temperature`` (the contract's head).

    Args:
        hidden: ``(..., H)``; gets a gradient, as do ``weight`` ``(V, H)`` and ``bias`` ``(V,)``.
        token_ids: integer, the leading shape of ``hidden``, values in ``[0, V)``.
        return_entropy: also return the entropy of the whole distribution per token.
        backend: ``"auto"``/``"torch"`` (token-chunked torch, ``chunk x V`` tiles), ``"cpu"``
            (the same chunks, per-row math in the native kernel: ``backends/cpu_rows.py``),
            ``"triton"`` (CUDA; fused kernels, no logits tensor: ``backends/triton_rows.py``)
            or ``"reference"`` (float64, materialized).
        tuning: chunk size / memory budget (``Tuning.chunk_vocab`` sets the Triton
            gradient's vocabulary stripe; the other backends keep rows whole).
        process_group: vocabulary parallelism, as ``fused_linear_kl``'s (``token_ids`` are global).

    Returns:
        Log-probs with the leading shape (fp32; float64 for float64 inputs), and the entropy when
        asked. Both are differentiable; any incoming gradient (e.g. importance weights) is honoured
        by recomputing the logits chunk by chunk in backward.
    """
    return run.per_token(logprobs_call(locals()))
