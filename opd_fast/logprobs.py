"""Per-token log-probabilities (and entropy) straight from hidden states and an LM head.

Uses: the sampler's log-probs for importance weights, the teacher's log-probs of the sampled
tokens, and the single-sample reverse-KL estimator ``log q(y) - log p(y)``, none of which may
hold an ``N x V`` logits tensor.

The chunk loop is ``backends.rows`` (shared with ``opd_fast.topk``); this module supplies
only the per-row math.
"""

from __future__ import annotations

import torch

from . import reference
from .backends import resolve
from .backends.chunked import Tuning
from .backends.rows import FusedRows, RowSetup, Upstream
from .validation import validate_logprobs_call

__all__ = ["fused_linear_logprobs"]


class _LogProbRows:
    """``log q(y)`` per row and optionally the entropy ``H = -sum q log q`` of ``q = softmax(z)``.

    Gradients: ``d log q(y)/dz = onehot(y) - q`` and ``dH/dz = -q (log q + H)``.
    """

    def __init__(self, token_ids: torch.Tensor, entropy: bool) -> None:
        self.token_ids = token_ids
        self.entropy = entropy
        self.n_outputs = self.n_differentiable = 2 if entropy else 1

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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each given token under ``softmax(z)``, without materializing logits.

    ``z = softcap(logit_scale * (hidden @ weight^T + bias)) / temperature`` (the contract's head).

    Args:
        hidden: ``(..., H)``; gets a gradient, as do ``weight`` ``(V, H)`` and ``bias`` ``(V,)``.
        token_ids: integer, the leading shape of ``hidden``, values in ``[0, V)``.
        return_entropy: also return the entropy of the whole distribution per token.
        backend: ``"auto"``/``"torch"`` (token-chunked torch, ``chunk x V`` tiles), ``"cpu"``
            (the same chunks, per-row math in the native kernel: ``backends/cpu_rows.py``),
            ``"triton"`` (CUDA; fused kernels, no ``chunk x V`` tensor: ``backends/triton_rows.py``)
            or ``"reference"`` (float64, materialized).
        tuning: chunk size / memory budget (``Tuning.chunk_vocab`` is not used: rows are whole).

    Returns:
        Log-probs with the leading shape (fp32; float64 for float64 inputs), and the entropy when
        asked. Both are differentiable; any incoming gradient (e.g. importance weights) is honoured
        by recomputing the logits chunk by chunk in backward.
    """
    name = resolve(backend, hidden.device)
    if name == "reference":
        return reference.fused_linear_logprobs(
            hidden, weight, token_ids, temperature=temperature, bias=bias, logit_scale=logit_scale,
            softcap=softcap, return_entropy=return_entropy,
        )  # fmt: skip
    spec = validate_logprobs_call(
        hidden, weight, token_ids, temperature=temperature, bias=bias, logit_scale=logit_scale, softcap=softcap
    )
    setup = RowSetup(spec, float(temperature), weight.shape[0], tuning or Tuning())
    fused, rows = FusedRows, _LogProbRows(token_ids.reshape(-1).long(), return_entropy)
    if name == "triton":
        from .backends.triton_rows import LogProbMath, TritonRows

        fused, rows = TritonRows, LogProbMath(rows)
    elif name == "cpu":
        from .backends.cpu_rows import NativeLogProbRows

        rows = NativeLogProbRows(rows, spec, temperature)
    outs = fused.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), rows, setup, None,
    )  # fmt: skip
    logprobs, *entropy = (out.reshape(token_ids.shape) for out in outs)
    return (logprobs, entropy[0]) if return_entropy else logprobs
