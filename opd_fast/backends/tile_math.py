"""Per-tile divergence math in torch: the one place the fast paths state the formulas.

Every divergence of the contract has the same gradient shape with respect to the
student's final logits ``z`` (``q = softmax(z)``):

    dD/dz = a - q * c,   a = q * dD/dq  (element-wise),   c = sum_v a_v  (per row)

so a tile only has to produce ``a`` and its row sum ``c``:

=============  ===================================  =====================================
divergence     a                                    c
=============  ===================================  =====================================
forward_kl     -p                                   -1 (p sums to one)
reverse_kl     q (log q - log p)                    KL(q||p), the row's value
jsd            (1-beta) q (log q - log M)           (1-beta) KL(q||M)
tvd            0.5 q sign(q - p)                    its row sum
=============  ===================================  =====================================

Hard labels (``fused_linear_kl(labels=...)``) add the cross-entropy at temperature 1,
``CE = lse(y) - y[label]`` with ``y = T z``, whose gradient is ``dCE/dz = T (softmax(y) - onehot)``.
With ``T = 1`` that is ``q - onehot`` and folds into the same form: a row with divergence scale
``s`` and hard scale ``h`` has ``dL/dz = s a - q (s c - h) - h onehot``, so no extra pass over
the tile is needed; with ``T != 1`` the tile pays one more exp for ``softmax(y)``.

Logits arrive *raw*: ``scale * (h W^T + b)`` comes from the caller's GEMM (which also
applies ``scale`` to the gradient); softcap and temperature are applied here, and their
derivative is chained in before the gradient tile goes back to the gradient GEMMs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..core.call import HeadSpec, LossOptions
from ..core.engine import accum_dtype


class RowTerms(NamedTuple):
    """Per-row partial sums over one vocabulary tile (fp32, shape (n,))."""

    divergence: torch.Tensor
    coef: torch.Tensor  # c = sum_v a_v
    entropy: torch.Tensor  # -sum q log q
    cross_entropy: torch.Tensor | None = None  # hard-label CE at temperature 1 (with labels only)


class HardLabels(NamedTuple):
    """Ground-truth labels of compacted rows for the hard-label cross-entropy.

    ``scale`` is each row's gradient scale of ``CE_i`` (the upstream gradient of the engine's
    ``cross_entropy`` output); None = no gradient wanted.
    """

    labels: torch.Tensor  # (n,) int64, NO_LABEL where the row has none
    scale: torch.Tensor | None

    def chunk(self, rows: slice, scale: torch.Tensor | None) -> HardLabels:
        """The rows ``rows`` with the gradient scale ``scale`` (already sliced, or None)."""
        return HardLabels(self.labels[rows], scale)


def finish_logits(raw: torch.Tensor, spec: HeadSpec, temperature: float) -> torch.Tensor:
    """fp32 final logits from a raw (already scaled) GEMM tile: softcap, then temperature.

    Works in place when ``raw`` is already fp32: tiles are scratch buffers of the caller.
    """
    z = raw.to(accum_dtype(raw.dtype))
    if spec.softcap is not None:
        z = torch.tanh(z.div_(spec.softcap)).mul_(spec.softcap)
    return z.div_(temperature) if temperature != 1.0 else z


def logits_grad_to_raw(grad_z: torch.Tensor, z: torch.Tensor, spec: HeadSpec, temperature: float) -> torch.Tensor:
    """Chain dL/dz back through ``z = softcap(r) / T`` (in place on ``grad_z``).

    The softcap derivative 1 - tanh^2 is recovered from ``z`` itself (tanh = z T / c), so
    nothing extra is kept; ``scale`` is applied by the caller on the GEMM output.
    """
    grad_z.div_(temperature)
    if spec.softcap is not None:
        tanh = z * (temperature / spec.softcap)
        grad_z.mul_(tanh.mul_(tanh).neg_().add_(1.0))
    return grad_z


def _where_pos(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weight * value with 0 * anything = 0, so -inf logits (zero mass) stay legal.

    Only an exact zero weight is guarded: a NaN weight (a non-finite input) must reach the sum.
    """
    return torch.where(weight == 0, torch.zeros((), dtype=value.dtype, device=value.device), weight * value)


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_v x y per row as a batched GEMV: one read of each tile, no (n, v) temporary."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


class _Products:
    """Element-wise and row-summed ``weight * value`` with the -inf guard only where needed.

    The guard (``_where_pos``) costs about as much as the rest of the tile math; it only
    matters where a logit is -inf (log-probability -inf, mass 0), so finite tiles skip it.
    ``value`` arguments are temporaries the callers give away (they may be overwritten).
    """

    def __init__(self, *logits: torch.Tensor) -> None:
        # amin is NaN-propagating: a NaN tile takes the guarded path too.
        self.finite = all(z.numel() == 0 or bool(z.amin() > float("-inf")) for z in logits)

    def tile(self, weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.mul_(weight) if self.finite else _where_pos(weight, value)

    def row_sum(self, weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return _rowdot(weight, value) if self.finite else _where_pos(weight, value).sum(-1)


def tile_terms(
    z_s: torch.Tensor, z_t: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor, opts: LossOptions
) -> tuple[RowTerms, torch.Tensor, torch.Tensor]:
    """Row partial sums, ``a`` and ``q`` of one (n, v) tile of final fp32 logits.

    ``lse_s`` / ``lse_t`` are the full-row log-sum-exps, so the tile's q and p are exact.
    """
    log_q = z_s - lse_s[:, None]
    log_p = (z_t - lse_t[:, None]).to(log_q.dtype)  # a float64 teacher meets a float32 student in fp32
    q = log_q.exp()
    p = log_p.exp()
    prod = _Products(log_q, log_p)
    entropy = -prod.row_sum(q, log_q)
    beta, div = opts.beta, opts.divergence
    if div == "jsd" and beta == 0.0:
        div = "forward_kl"
    elif div == "jsd" and beta == 1.0:
        div = "reverse_kl"

    if div == "forward_kl":
        # two row dots instead of a (log p - log q) tile; identical rows still give exactly 0
        value = prod.row_sum(p, log_p) - prod.row_sum(p, log_q)
        a = p.neg_()
        coef = a.sum(-1)
    elif div == "reverse_kl":
        a = prod.tile(q, log_q - log_p)
        value = a.sum(-1)
        coef = value
    elif div == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_p = prod.row_sum(p, log_p - log_m)
        a = prod.tile(q, log_q - log_m)
        kl_q = a.sum(-1)
        value = beta * kl_p + (1.0 - beta) * kl_q
        a.mul_(1.0 - beta)
        coef = kl_q * (1.0 - beta)
    else:  # tvd
        diff = q - p
        value = 0.5 * diff.abs().sum(-1)
        a = diff.sign_().mul_(q).mul_(0.5)
        # torch.sign(NaN) is 0, which would drop a NaN teacher entry from the gradient: the row's
        # value (NaN then) poisons c instead, a per-row select rather than a pass over the tile
        coef = torch.where(value.isnan(), value, a.sum(-1))
    return RowTerms(value, coef, entropy), a, q


def grad_from_terms(a: torch.Tensor, q: torch.Tensor, coef: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """dL/dz = row_scale * (a - q c), written over ``a``."""
    return a.sub_(q.mul_(coef[:, None])).mul_(row_scale[:, None])


def hard_lse(z: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-sum-exp of the temperature-1 logits ``y = T z`` of a tile (``lse`` itself when T = 1)."""
    return lse if temperature == 1.0 else torch.logsumexp(z * temperature, -1)


def _label_columns(labels: torch.Tensor, v0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows' labels fall in the tile's columns ``v0:v0 + width``, and their column there (0 elsewhere)."""
    inside = (labels >= v0) & (labels < v0 + width)
    return inside, torch.where(inside, labels - v0, 0)


def label_logits(z: torch.Tensor, labels: torch.Tensor, v0: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``z[row, label]`` for labels inside this tile's columns ``v0:v0 + v`` (0 elsewhere) and that mask."""
    inside, column = _label_columns(labels, v0, z.shape[1])
    return torch.where(inside, z.gather(1, column[:, None])[:, 0], 0.0), inside


def add_hard_grad(
    grad: torch.Tensor, z: torch.Tensor, lse_y: torch.Tensor, hard: HardLabels, temperature: float, v0: int = 0,
    softmax_done: bool = False,
) -> torch.Tensor:
    """``grad += h T (softmax(T z) - onehot(label))`` on the tile's columns ``v0:``, in place.

    ``softmax_done``: the ``softmax`` part is already in ``grad`` (T = 1 fold, see the module docstring).
    """
    h_t = hard.scale * temperature
    if not softmax_done:
        grad.add_((z * temperature).sub_(lse_y[:, None]).exp_().mul_(h_t[:, None]))
    inside, column = _label_columns(hard.labels, v0, z.shape[1])
    return grad.scatter_add_(1, column[:, None], torch.where(inside, -h_t, 0.0)[:, None].to(grad.dtype))


def cross_entropy(z: torch.Tensor, lse_y: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row ``lse(y) - y[label]`` (``y = T z``) over a full row; 0 where the row has no label."""
    z_label, inside = label_logits(z, labels)
    return torch.where(inside, lse_y - z_label * temperature, 0.0)


class TorchTileMath:
    """Full-row tile math in torch: what the native CPU kernel replaces."""

    def live_bytes_per_logit(self, dtype: torch.dtype) -> int:
        """Six accumulation-dtype tiles are alive at once (two logits tiles, q, p, a, temporaries)."""
        return 6 * accum_dtype(dtype).itemsize

    def logits_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The GEMM's own dtype: the tiles are upcast to the accumulation dtype as they are used."""
        return dtype

    def full_rows(
        self,
        raw_s: torch.Tensor,
        raw_t: torch.Tensor,
        opts: LossOptions,
        row_scale: torch.Tensor | None,
        hard: HardLabels | None = None,
        grad_dtype: torch.dtype | None = None,  # unused: the gradient comes back in fp32 or raw_s's dtype
    ) -> tuple[RowTerms, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Everything for rows whose whole compared vocabulary is in the tile.

        Returns (terms, student_lse, teacher_lse, grad) where ``grad`` is dL/d(raw_s) of
        ``sum_i row_scale_i D_i + hard.scale_i CE_i`` (None when no gradient is wanted: then
        ``hard.scale`` is None too), in fp32 (the native kernel may instead return it in
        ``raw_s``'s dtype, written over ``raw_s``). ``terms.cross_entropy`` is set with ``hard``.
        """
        t = opts.temperature
        z_s = finish_logits(raw_s, opts.student, t)
        z_t = finish_logits(raw_t, opts.teacher, t)
        lse_s = torch.logsumexp(z_s, -1)
        lse_t = torch.logsumexp(z_t, -1)
        terms, a, q = tile_terms(z_s, z_t, lse_s, lse_t, opts)
        if hard is not None:
            lse_y = hard_lse(z_s, lse_s, t)
            terms = terms._replace(cross_entropy=cross_entropy(z_s, lse_y, hard.labels, t))
        if row_scale is None:
            return terms, lse_s, lse_t, None
        if hard is not None and t == 1.0:  # s a - q (s c - h): the CE's softmax part rides along
            grad = a.mul_(row_scale[:, None]).sub_(q.mul_((row_scale * terms.coef - hard.scale)[:, None]))
            grad = add_hard_grad(grad, z_s, lse_y, hard, t, softmax_done=True)
        else:
            grad = grad_from_terms(a, q, terms.coef, row_scale)
            if hard is not None:
                grad = add_hard_grad(grad, z_s, lse_y, hard, t)
        return terms, lse_s, lse_t, logits_grad_to_raw(grad, z_s, opts.student, t)
