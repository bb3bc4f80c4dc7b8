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

Logits arrive *raw*: ``scale * (h W^T + b)`` comes from the caller's GEMM (which also
applies ``scale`` to the gradient); softcap and temperature are applied here, and their
derivative is chained in before the gradient tile goes back to the gradient GEMMs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..validation import HeadSpec, LossOptions


class RowTerms(NamedTuple):
    """Per-row partial sums over one vocabulary tile (fp32, shape (n,))."""

    divergence: torch.Tensor
    coef: torch.Tensor  # c = sum_v a_v
    entropy: torch.Tensor  # -sum q log q


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; float64 stays float64 (gradcheck, references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    """weight * value with 0 * anything = 0, so -inf logits (zero mass) stay legal."""
    return torch.where(weight > 0, weight * value, torch.zeros((), dtype=value.dtype, device=value.device))


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
        self.finite = all(bool(z.amin() > float("-inf")) for z in logits)

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
    log_p = z_t - lse_t[:, None]
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
        coef = a.sum(-1)
    return RowTerms(value, coef, entropy), a, q


def grad_from_terms(a: torch.Tensor, q: torch.Tensor, coef: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """dL/dz = row_scale * (a - q c), written over ``a``."""
    return a.sub_(q.mul_(coef[:, None])).mul_(row_scale[:, None])


class TorchTileMath:
    """Full-row tile math in torch: what the native CPU kernel replaces."""

    name = "torch"

    def live_bytes_per_logit(self, dtype: torch.dtype) -> int:
        """Six accumulation-dtype tiles are alive at once (two logits tiles, q, p, a, temporaries)."""
        return 6 * accum_dtype(dtype).itemsize

    def full_rows(
        self,
        raw_s: torch.Tensor,
        raw_t: torch.Tensor,
        opts: LossOptions,
        row_scale: torch.Tensor | None,
    ) -> tuple[RowTerms, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Everything for rows whose whole compared vocabulary is in the tile.

        Returns (terms, student_lse, teacher_lse, grad) where ``grad`` is dL/d(raw_s)
        per row scaled by ``row_scale`` (None when no gradient is wanted), in fp32 (the
        native kernel may instead return it in ``raw_s``'s dtype, written over ``raw_s``).
        """
        z_s = finish_logits(raw_s, opts.student, opts.temperature)
        z_t = finish_logits(raw_t, opts.teacher, opts.temperature)
        lse_s = torch.logsumexp(z_s, -1)
        lse_t = torch.logsumexp(z_t, -1)
        terms, a, q = tile_terms(z_s, z_t, lse_s, lse_t, opts)
        grad = None
        if row_scale is not None:
            grad = logits_grad_to_raw(grad_from_terms(a, q, terms.coef, row_scale), z_s, opts.student,
                                      opts.temperature)
        return terms, lse_s, lse_t, grad
