"""Triton backend of the single-head losses: ``fused_linear_logprobs`` and ``fused_linear_kl_topk``.

Both need, per row, only a few numbers from the ``V`` logits: the log-sum-exp of the logits
outside a per-row id set (the token; the teacher's top-k), the ids' own logits and, for the
entropy, the tail's softmax mean. ``tail_lse`` computes them in one sweep, so the per-row math
(``RowMath``: log-prob and entropy; top-k categories through ``tile_math.tile_terms``) runs in
torch on ``(n, k + 1)`` tensors. The gradient splits the same way: outside the ids it has one
dense shape (``tail_grad``: recomputed tiles into logit-gradient stripes), on the ids it is known
exactly here and added into the stripes before torch runs their grad GEMMs (``triton/stripes.py``);
a loss that is zero outside the ids takes the k-sparse product alone, ``O(n k H)``. No logits
tensor is ever allocated; the stripe buffer is bounded by ``Tuning.memory_budget_mb``.

``TritonRowsEngine`` is this as an ``Engine``: a gradient-only call reuses the forward's per-row
state (no second sweep). Like ``triton_backend``, it runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from ..core.engine import EngineResult, Student, StudentGrads, Upstream, Want, logprob_outputs, topk_outputs
from .row_math import TopKCategories
from .rows import RowSetup
from .tile_math import grad_from_terms, logits_grad_to_raw
from .triton import BlockConfig, launch_tail_grad, launch_tail_lse, pick_config
from .triton.common import NO_ID
from .triton.stripes import SparseColumns
from .triton_backend import check_dtypes, device_arch, on_device, stripe_plan, vocab_splits

__all__ = ["LogProbMath", "RowMath", "TopKMath", "TritonRowsEngine"]

_NEG_INF = float("-inf")


class RowState(NamedTuple):
    """What the forward sweep leaves per row (fp32)."""

    lse_tail: torch.Tensor  # (n,) log-sum-exp outside the row's ids; -inf when nothing is outside
    mean_tail: torch.Tensor | None  # (n,) softmax mean of those logits (entropy only)
    z_ids: torch.Tensor  # (n, k) the ids' final logits in the caller's order; -inf on padding


class DenseGrad(NamedTuple):
    """dL/dz outside the ids: ``exp(z - lse_ref) (coef + slope (z - lse_ref))`` (``tail_grad``)."""

    lse_ref: torch.Tensor
    coef: torch.Tensor
    slope: torch.Tensor | None


class RowMath(Protocol):
    """Per-row math of a single-head loss on its ``RowState``.

    ``ids`` ``(n, k)`` are in range everywhere (padding points at some real id) and ``valid``
    marks the real slots. ``gradient`` returns the dense part (None: zero outside the ids) and
    dL/dz on the ids ``(n, k)``, 0 on padding.
    """

    ids: torch.Tensor
    valid: torch.Tensor
    entropy: bool
    output_names: tuple[str, ...]
    n_differentiable: int

    def outputs(self, state: RowState) -> list[torch.Tensor]: ...

    def gradient(self, state: RowState, upstream: Upstream) -> tuple[DenseGrad | None, torch.Tensor]: ...


def _q_times(log_q: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``exp(log_q) * value`` with zero mass giving 0 (no 0 * inf); a NaN ``log_q`` stays NaN."""
    return torch.where(log_q == _NEG_INF, 0.0, log_q.exp() * value)


def _entropy(state: RowState, lse: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary entropy ``-sum q log q``: the ids' terms plus the tail's ``w (E_tail[z] - lse)``."""
    log_q_ids = state.z_ids - lse[:, None]
    log_w = state.lse_tail - lse
    return -(_q_times(log_q_ids, log_q_ids).sum(-1) + _q_times(log_w, state.mean_tail - lse))


class LogProbMath:
    """``log q(y)`` and optionally the entropy; the token's column is the id set (k = 1)."""

    def __init__(self, token_ids: torch.Tensor, entropy: bool) -> None:
        self.ids = token_ids[:, None]
        self.valid = torch.ones_like(self.ids, dtype=torch.bool)
        self.entropy = entropy
        self.output_names = logprob_outputs(entropy)
        self.n_differentiable = len(self.output_names)

    def _values(self, state: RowState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        z_y = state.z_ids[:, 0]
        lse = torch.logaddexp(state.lse_tail, z_y)
        # log q(y) = -softplus(lse_tail - z_y): no cancellation when y holds almost all the mass
        logprob = torch.nn.functional.softplus(state.lse_tail - z_y).neg_()
        return lse, logprob, _entropy(state, lse) if self.entropy else None

    def outputs(self, state: RowState) -> list[torch.Tensor]:
        _, logprob, entropy = self._values(state)
        return [logprob] if entropy is None else [logprob, entropy]

    def gradient(self, state: RowState, upstream: Upstream) -> tuple[DenseGrad | None, torch.Tensor]:
        lse, logprob, entropy = self._values(state)
        u_lp = upstream[0] if upstream[0] is not None else torch.zeros_like(lse)
        u_ent = upstream[1] if self.entropy else None
        # dL/dz = u_lp (onehot(y) - q) - u_ent q (log q + H); the token's column exactly:
        at_y = u_lp * -torch.expm1(logprob)
        if u_ent is None:
            return DenseGrad(lse, -u_lp, None), at_y[:, None]
        at_y = at_y - u_ent * _q_times(logprob, logprob + entropy)
        return DenseGrad(lse, -(u_lp + u_ent * entropy), -u_ent), at_y[:, None]


class TopKMath:
    """The top-k teacher loss on its categories (``row_math.TopKCategories``, from a ``RowState``)."""

    n_differentiable = 1

    def __init__(self, categories: TopKCategories, entropy: bool) -> None:
        self.categories = categories
        self.ids, self.valid, self.entropy, self.bucket = categories.ids, categories.valid, entropy, categories.bucket
        self.output_names = topk_outputs(entropy)

    def _terms(self, state: RowState):
        top = state.z_ids  # -inf on padding
        lse_top = torch.logsumexp(top, -1)
        lse = torch.logaddexp(state.lse_tail, lse_top)
        return lse, lse_top, self.categories.category_terms(top, lse_top, state.lse_tail, lse)

    def outputs(self, state: RowState) -> list[torch.Tensor]:
        lse, lse_top, (terms, _, _) = self._terms(state)
        outs = [terms.divergence, lse, (lse_top - lse).exp()]
        return [*outs, _entropy(state, lse)] if self.entropy else outs

    def gradient(self, state: RowState, upstream: Upstream) -> tuple[DenseGrad | None, torch.Tensor]:
        _, _, (terms, a, q) = self._terms(state)
        grad_cat = grad_from_terms(a, q, terms.coef, upstream[0])
        k = self.ids.shape[1]
        dense = None
        if self.bucket:  # the tail category's log-sum-exp: d/dz_v = exp(z_v - lse_tail) on the tail
            tail = state.lse_tail
            dense = DenseGrad(torch.where(torch.isneginf(tail), 0.0, tail), grad_cat[:, k].contiguous(), None)
        return dense, grad_cat[:, :k]


def _tile_config(kernel: str, hs: torch.Tensor) -> BlockConfig:
    return pick_config(kernel, device_arch(hs.device), hs.dtype, hs.shape[0])


def _sorted_ids(math: RowMath) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' id lists: int32, ascending per row, ``NO_ID`` in padding slots; and the sort order."""
    keyed = torch.where(math.valid, math.ids, int(NO_ID.value)).to(torch.int32)
    if keyed.shape[1] == 1:
        return keyed.contiguous(), torch.zeros_like(keyed, dtype=torch.long)
    ids, order = keyed.sort(-1)
    return ids.contiguous(), order


def _sweep(hs, ws, bs, ids, order, math: RowMath, setup: RowSetup) -> RowState:
    config = _tile_config("tail_lse", hs)
    splits = vocab_splits(hs.device, hs.shape[0], setup.vocab, config.block_m, config.block_n)
    lse_tail, mean_tail, z_sorted = launch_tail_lse(hs, ws, bs, ids, setup, math.entropy, config, splits)
    return RowState(lse_tail, mean_tail, torch.empty_like(z_sorted).scatter_(1, order, z_sorted))


def _gradients(hs, ws, bs, ids, math: RowMath, state: RowState, setup: RowSetup, upstream: Upstream, want: Want,
               ) -> StudentGrads:
    """The dense tail kernel's stripes with the k id columns added into them; the id columns alone
    (an ``O(n k H)`` sparse product, fp32 accumulators) when the loss is zero outside the ids."""
    n, hidden = hs.shape
    dense, at_ids = math.gradient(state, upstream) if n else (None, state.z_ids)
    # dL/d(h W^T + b) on the ids: chain temperature, softcap (from the logits) and scale.
    z_ids = torch.where(torch.isfinite(state.z_ids), state.z_ids, 0.0)
    g = logits_grad_to_raw(at_ids.float(), z_ids, setup.spec, setup.temperature).mul_(setup.spec.scale)
    g = g.masked_fill_(~math.valid, 0.0)
    if dense is not None:
        config = _tile_config("tail_grad", hs)
        plan = stripe_plan(hs.device, setup.tuning, n, setup.vocab, ws.dtype, config)
        slope = None if dense.slope is None else dense.slope.contiguous()
        return launch_tail_grad(Student(hs, ws, bs), ids, dense.lse_ref.contiguous(), dense.coef.contiguous(), slope,
                                setup, want, config, plan, SparseColumns(math.ids, g, math.valid))
    acc = {"dtype": torch.float32, "device": hs.device}
    grad_h = torch.zeros(n, hidden, **acc) if want.hidden else None
    grad_w = torch.zeros(ws.shape, **acc) if want.weight else None
    grad_b = torch.zeros(ws.shape[0], **acc) if want.bias else None
    hs32 = hs.float() if want.weight else None
    for j in range(math.ids.shape[1]):  # one (n, H) temporary at a time: O(n k H) in all
        col, ids_j = g[:, j, None], math.ids[:, j]
        if grad_h is not None:
            grad_h.add_(ws.index_select(0, ids_j).float().mul_(col))
        if grad_w is not None:
            grad_w.index_add_(0, ids_j, hs32 * col)
    if grad_b is not None:
        grad_b.index_add_(0, math.ids.reshape(-1), g.reshape(-1))
    return StudentGrads(grad_h, grad_w, grad_b)


class TritonRowsEngine:
    """A ``RowMath`` on the Triton kernels, as an ``Engine`` (state: the sorted ids and ``RowState``)."""

    def __init__(self, math: RowMath, setup: RowSetup) -> None:
        self.math, self.setup = math, setup
        self.output_names, self.n_differentiable = math.output_names, math.n_differentiable

    def run(self, student: Student, upstream: Upstream | None, want: Want,
            state: tuple[torch.Tensor, RowState] | None = None) -> EngineResult:
        hs, math = student.hidden, self.math
        check_dtypes(hidden=hs)
        with on_device(hs.device):
            if state is None:
                ids, order = _sorted_ids(math)
                state = ids, _sweep(*student, ids, order, math, self.setup)
            ids, rows = state
            outs = math.outputs(rows) if hs.shape[0] else [rows.lse_tail.clone() for _ in math.output_names]
            grads = None
            if upstream is not None:
                upstream = [None if u is None else u.float() for u in upstream]
                grads = _gradients(*student, ids, math, rows, self.setup, upstream, want)
        return EngineResult(tuple(outs), grads, state)
