"""Token compaction and reduction coefficients shared by every public loss.

Masked tokens are removed before any GEMM, so the backends only ever see the counted rows
of a flat ``(rows, H)`` view; this module owns that mapping (and its inverse for per-token
outputs) and the per-row coefficient that turns a reduction into ``sum_i c_i D_i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .call import HardLabelArgs, LossCall, LossOptions
from .engine import accum_dtype

NO_LABEL = -1  # a compacted row without a ground-truth label (ignore_index, or no labels at all)


class RowLabels(NamedTuple):
    """The counted rows' labels (``NO_LABEL`` where none) and their cross-entropy's reduction coefficients."""

    ids: torch.Tensor
    coefficients: torch.Tensor


@dataclass(frozen=True)
class TokenRows:
    """The counted tokens of a ``leading``-shaped batch, flattened."""

    leading: tuple[int, ...]
    rows: torch.Tensor | None  # flat indices of counted tokens; None = all tokens count
    weights: torch.Tensor  # token weight per counted row, in the accumulation dtype

    @classmethod
    def of(cls, call: LossCall) -> TokenRows:
        """The counted tokens of ``call`` (its mask), weighted by its token weights."""
        hidden = call.student.hidden
        return cls.build(call.leading, hidden.dtype, hidden.device, call.mask, call.token_weights)

    @classmethod
    def build(
        cls,
        leading: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        mask: torch.Tensor | None,
        token_weights: torch.Tensor | None,
    ) -> TokenRows:
        acc = accum_dtype(dtype)
        if token_weights is None:
            weights = torch.ones(math.prod(leading), dtype=acc, device=device)
        else:
            weights = token_weights.reshape(-1).to(acc)
        rows = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
        return cls(leading, rows, weights if rows is None else weights.index_select(0, rows))

    def take(self, per_token: torch.Tensor) -> torch.Tensor:
        """The counted rows of a ``(*leading, ...)`` tensor, as ``(rows, ...)`` (differentiable)."""
        flat = per_token.reshape(-1, *per_token.shape[len(self.leading) :])
        return flat if self.rows is None else flat.index_select(0, self.rows)

    def expand(self, per_row: torch.Tensor) -> torch.Tensor:
        """Per-row values back to the leading shape, 0 on masked tokens (differentiable)."""
        if self.rows is not None:
            per_row = per_row.new_zeros(math.prod(self.leading)).index_copy(0, self.rows, per_row)
        return per_row.reshape(self.leading)

    def coefficients(self, opts: LossOptions) -> torch.Tensor:
        """Per-row c_i such that the loss is sum_i c_i D_i ("mean"/"sum") or c_i D_i ("none")."""
        return _reduction_coefficients(self.weights, opts) * opts.loss_scale

    def labels(self, hard: HardLabelArgs, opts: LossOptions) -> RowLabels:
        """The counted rows' labels and the coefficients of their cross-entropy *before*
        ``hard_weight`` (the ``hard_loss`` statistic): "mean" averages over the labelled tokens only."""
        ids = self.take(hard.labels).long()
        labelled = ids != hard.ignore_index
        coefficients = _reduction_coefficients(self.weights * labelled, opts)
        return RowLabels(torch.where(labelled, ids, NO_LABEL), coefficients)


def _reduction_coefficients(weights: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """Per-row token weights divided by the "mean" denominator (num_items, or their sum when > 0)."""
    if opts.reduction != "mean":
        return weights
    denom = opts.num_items if opts.num_items is not None else float(weights.sum())
    return weights / denom if denom > 0 else weights
