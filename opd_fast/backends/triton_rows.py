"""Triton backend of the single-head losses: ``fused_linear_logprobs`` and ``fused_linear_kl_topk``.

Both need, per row, only a few numbers from the ``V`` logits: the log-sum-exp of the logits
outside a per-row id set (the token; the teacher's top-k), the ids' own logits and, for the
entropy, the tail's softmax mean. ``tail_lse`` computes them in one sweep, so the per-row math
(``RowMath``: log-prob and entropy; top-k categories through ``tile_math.tile_terms``) runs in
torch on ``(n, k + 1)`` tensors. The gradient splits the same way: outside the ids it has one
dense shape (``tail_grad``, recomputed tiles, atomic gradient GEMMs), on the ids it is a
k-sparse correction done here in ``O(n k H)``. No ``chunk x V`` tensor is ever allocated.

``TritonRows`` has ``rows.FusedRows``' contract (scalar ``row_weights``: gradients during the
forward; ``None``: per-row outputs, gradients in backward), so the public functions swap one for
the other. Like ``triton_backend``, the tests run it on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from .rows import RowSetup, Upstream
from .tile_math import grad_from_terms, logits_grad_to_raw
from .triton import BlockConfig, launch_tail_grad, launch_tail_lse, pick_config
from .triton.common import NO_ID
from .triton_backend import device_arch, on_device, vocab_splits

__all__ = ["LogProbMath", "RowMath", "TopKMath", "TritonRows"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
    n_outputs: int
    n_differentiable: int

    def outputs(self, state: RowState) -> list[torch.Tensor]: ...

    def gradient(self, state: RowState, upstream: Upstream) -> tuple[DenseGrad | None, torch.Tensor]: ...


def _q_times(log_q: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``exp(log_q) * value`` with zero mass giving 0 (no 0 * inf)."""
    return torch.where(log_q > _NEG_INF, log_q.exp() * value, 0.0)


def _entropy(state: RowState, lse: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary entropy ``-sum q log q``: the ids' terms plus the tail's ``w (E_tail[z] - lse)``."""
    log_q_ids = state.z_ids - lse[:, None]
    log_w = state.lse_tail - lse
    return -(_q_times(log_q_ids, log_q_ids).sum(-1) + _q_times(log_w, state.mean_tail - lse))


class LogProbMath:
    """``log q(y)`` and optionally the entropy; the token's column is the id set (k = 1)."""

    def __init__(self, rows) -> None:
        """``rows``: ``logprobs._LogProbRows`` (its ``token_ids`` and ``entropy``)."""
        self.ids = rows.token_ids[:, None]
        self.valid = torch.ones_like(self.ids, dtype=torch.bool)
        self.entropy = rows.entropy
        self.n_outputs = self.n_differentiable = rows.n_outputs

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
    """The top-k teacher loss on its categories (``topk._TopKRows``' math, from a ``RowState``)."""

    n_differentiable = 1

    def __init__(self, rows) -> None:
        """``rows``: ``topk._TopKRows`` (its ids, category math, tail and outputs)."""
        self.rows = rows
        self.ids, self.valid, self.entropy = rows.ids, rows.valid, rows.entropy
        self.bucket, self.n_outputs = rows.bucket, rows.n_outputs

    def _terms(self, state: RowState):
        top = state.z_ids  # -inf on padding
        lse_top = torch.logsumexp(top, -1)
        lse = torch.logaddexp(state.lse_tail, lse_top)
        return lse, lse_top, self.rows.category_terms(top, lse_top, state.lse_tail, lse)

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


def _gradients(hs, ws, bs, ids, math: RowMath, state: RowState, setup: RowSetup, upstream: Upstream, want):
    """fp32 (grad_h, grad_w, grad_b): the dense tail kernel plus the k-sparse id columns."""
    n, hidden = hs.shape
    dense, at_ids = math.gradient(state, upstream) if n else (None, state.z_ids)
    want_b = want[2] and bs is not None
    if dense is None:
        acc = {"dtype": torch.float32, "device": hs.device}
        grad_h = torch.zeros(n, hidden, **acc) if want[0] else None
        grad_w = torch.zeros(ws.shape, **acc) if want[1] else None
        grad_b = torch.zeros(ws.shape[0], **acc) if want_b else None
    else:
        config = _tile_config("tail_grad", hs)
        splits = vocab_splits(hs.device, n, setup.vocab, config.block_m, config.block_n)
        slope = None if dense.slope is None else dense.slope.contiguous()
        grad_h, grad_w, grad_b = launch_tail_grad(hs, ws, bs, ids, dense.lse_ref.contiguous(), dense.coef.contiguous(),
                                                  slope, setup, (want[0], want[1], want_b), config, splits)
    # dL/d(h W^T + b) on the ids: chain temperature, softcap (from the logits) and scale.
    z_ids = torch.where(torch.isfinite(state.z_ids), state.z_ids, 0.0)
    g = logits_grad_to_raw(at_ids.float(), z_ids, setup.spec, setup.temperature).mul_(setup.spec.scale)
    g = g.masked_fill_(~math.valid, 0.0)
    hs32 = hs.float() if want[1] else None
    for j in range(math.ids.shape[1]):  # one (n, H) temporary at a time: O(n k H) in all
        col, ids_j = g[:, j, None], math.ids[:, j]
        if grad_h is not None:
            grad_h.add_(ws.index_select(0, ids_j).float().mul_(col))
        if grad_w is not None:
            grad_w.index_add_(0, ids_j, hs32 * col)
    if grad_b is not None:
        grad_b.index_add_(0, math.ids.reshape(-1), g.reshape(-1))
    return grad_h, grad_w, grad_b


class TritonRows(torch.autograd.Function):
    """``rows.FusedRows``' contract on the Triton kernels, for a ``RowMath``.

    ``row_weights`` given: returns ``(sum_i row_weights_i * out0_i, *outputs)``, gradients computed
    during the forward and scaled in backward. ``None``: returns the per-row outputs, the first
    ``math.n_differentiable`` differentiable; backward runs the gradient kernel with the incoming
    per-row gradients (the forward's per-row state is kept: no second forward sweep).
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, math: RowMath, setup: RowSetup, row_weights):
        if hs.dtype not in _DTYPES:
            raise ValueError(f"backend='triton' supports fp32, fp16 and bf16 inputs; hidden is {hs.dtype}")
        want = tuple(ctx.needs_input_grad[:3])
        ctx.set_materialize_grads(False)
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        with torch.no_grad(), on_device(hs.device):
            ids, order = _sorted_ids(math)
            state = _sweep(hs, ws, bs, ids, order, math, setup)
            outs = math.outputs(state) if hs.shape[0] else [state.lse_tail.clone() for _ in range(math.n_outputs)]
            if row_weights is None:
                ctx.save_for_backward(hs, ws, bs)
                ctx.meta = (math, setup, want, ids, state)
                ctx.mark_non_differentiable(*outs[math.n_differentiable :])
                return tuple(outs)
            grads = (None, None, None)
            if any(want):
                upstream = [row_weights.float()] + [None] * (math.n_differentiable - 1)
                grads = _gradients(hs, ws, bs, ids, math, state, setup, upstream, want)
            ctx.save_for_backward(*grads)
            ctx.meta = None
            ctx.mark_non_differentiable(*outs)
            return ((outs[0] * row_weights).sum(), *outs)

    @staticmethod
    def backward(ctx, *grads):
        none = (None,) * 6
        if ctx.meta is None:
            g = grads[0]
            if g is None:
                return none
            grads_in = [None if t is None else t * g for t in ctx.saved_tensors]
        else:
            hs, ws, bs = ctx.saved_tensors
            math, setup, want, ids, state = ctx.meta
            upstream = [None if g is None else g.float() for g in grads[: math.n_differentiable]]
            if all(u is None for u in upstream):
                return none
            with torch.no_grad(), on_device(hs.device):
                grads_in = _gradients(hs, ws, bs, ids, math, state, setup, upstream, want)
        cast = [None if t is None else t.to(dtype) for t, dtype in zip(grads_in, ctx.dtypes, strict=True)]
        return (*cast, None, None, None)
