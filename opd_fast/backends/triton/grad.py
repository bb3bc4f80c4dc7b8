"""Pass 3: student gradients. Recompute each logit tile pair of one vocabulary stripe, form
dL/dlogits in registers and store it into the stripe's buffer; the grad GEMMs run in torch.

Per tile: ``g = row_scale (a - q c)`` (``a``, ``q`` from ``tile_terms``, ``c`` from pass 2),
chained through temperature, softcap (``1 - tanh^2``, recovered from the logits) and scale,
then stored (``common.store_grad_tile``) in the head's dtype. ``stripes.stripe_gradients`` runs
the kernel once per stripe of ``V_c`` columns and does ``grad_h += G @ W[stripe]``,
``grad_W[stripe] = G^T @ h`` and ``grad_b[stripe] = sum_rows G`` (why not atomics: ``stripes.py``).

Grid ``(cdiv(N, BLOCK_M), n_splits)`` as in the statistics passes: program ``(i, s)`` walks the
stripe's vocabulary blocks ``s, s + n_splits, ...`` for one block of rows.

Hard labels (``HAS_LABELS``) add ``h T (softmax(T z) - onehot(label))`` with ``h`` the row's
hard scale: at T = 1 the softmax part folds into the same register expression,
``s a - q (s c - h)`` (no extra exp); at T != 1 (``HARD_LSE``) it costs one exp per element
against the row's ``lse(T z)`` from pass 2.

``STATS`` (forward KL with a known teacher log-sum-exp): the per-row divergence and student
entropy are summed from the same tiles, so the statistics need no sweep over the teacher: a
student-only log-sum-exp pass, then this one (forward KL's ``c`` is -1 whatever the rows hold).

Gradient filtering (``Tuning.grad_filter_eps``): a tile whose largest ``|g|`` is below ``eps``
is stored as zeros (``HAS_FILTER``): the values of skipping it, though the torch GEMMs still
multiply the zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.call import LossOptions
from ...core.engine import Student, StudentGrads, Want
from ..tile_math import HardLabels
from .common import (
    GRAD_HEURISTICS,
    HEAD_HEURISTICS,
    LABEL_HEURISTICS,
    BlockConfig,
    divergence_code,
    head_arguments,
    head_tile,
    jsd_logs,
    label_hit,
    store_grad_tile,
    tile_terms,
)
from .stripes import StripePlan, stripe_gradients


@triton.heuristics({
    **HEAD_HEURISTICS,
    **LABEL_HEURISTICS,
    **GRAD_HEURISTICS,
    "STATS": lambda args: args["div_ptr"] is not None,
})
@triton.jit
def grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, coef_ptr, row_scale_ptr,
    labels_ptr, hard_scale_ptr, lse_y_ptr, g_ptr, g_stride, stripe0, stripe_end, div_ptr, ent_ptr,
    N, K, HS, HT, n_splits, scale_s, scale_t, cap_s, cap_t, inv_temp, temperature, beta, log_beta, log_1m_beta,
    filter_eps,
    DIVERGENCE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_PRECISION_T: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr,
    EVEN_KS: tl.constexpr, EVEN_KT: tl.constexpr,
    HAS_LABELS: tl.constexpr, HARD_LSE: tl.constexpr,
    HAS_FILTER: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``g_ptr``: the stripe's ``(N, g_stride)`` buffer for columns ``stripe0:stripe_end`` (``stripe0`` a
    multiple of BLOCK_N). STATS: ``div_ptr`` / ``ent_ptr`` receive the program's share of the row's
    divergence and entropy (one partial per split, ``(n_splits, N)``)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    if HAS_LABELS:
        hard = tl.load(hard_scale_ptr + rows, mask=row_ok, other=0.0)
    if HARD_LSE:
        lse_y = tl.load(lse_y_ptr + rows, mask=row_ok, other=0.0)
    if STATS:
        div = tl.zeros((BLOCK_M,), tl.float32)
        ent = tl.zeros((BLOCK_M,), tl.float32)
    for vb in range(stripe0 // BLOCK_N + split, tl.cdiv(stripe_end, BLOCK_N), n_splits):
        z_s = head_tile(hs_ptr, ws_ptr, bs_ptr, pid_m * BLOCK_M, vb * BLOCK_N, N, K, HS, scale_s, cap_s, inv_temp,
                        HAS_BIAS_S, HAS_SOFTCAP_S, EVEN_KS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        z_t = head_tile(ht_ptr, wt_ptr, bt_ptr, pid_m * BLOCK_M, vb * BLOCK_N, N, K, HT, scale_t, cap_t, inv_temp,
                        HAS_BIAS_T, HAS_SOFTCAP_T, EVEN_KT, DOT_PRECISION_T, BLOCK_M, BLOCK_N, BLOCK_K)
        value, a, q, q_log_q = tile_terms(z_s, z_t, lse_s, lse_t, beta, log_beta, log_1m_beta, DIVERGENCE)
        if STATS:
            div += tl.sum(value, 1)
            ent -= tl.sum(q_log_q, 1)
        if HARD_LSE:  # s (a - q c) / T + h (softmax(T z) - onehot): the CE's own softmax
            softmax_y = tl.exp(z_s * temperature - lse_y[:, None])
            g = (a - q * coef[:, None]) * (row_scale * inv_temp)[:, None] + hard[:, None] * softmax_y
        elif HAS_LABELS:  # T = 1: s a - q (s c - h), the CE's softmax is q
            g = a * row_scale[:, None] - q * (row_scale * coef - hard)[:, None]
        else:
            g = (a - q * coef[:, None]) * (row_scale * inv_temp)[:, None]
        if HAS_LABELS:
            g -= tl.where(label_hit(labels_ptr, rows, row_ok, vb * BLOCK_N, BLOCK_N), hard[:, None], 0.0)
        # Zero mass (padded columns, -inf logits, padded rows) gets exactly zero gradient.
        live = row_ok[:, None] & (z_s != float("-inf"))
        store_grad_tile(g, z_s, live, g_ptr, g_stride, pid_m * BLOCK_M, vb * BLOCK_N, stripe0, N, stripe_end,
                        cap_s, inv_temp, scale_s, filter_eps, HAS_SOFTCAP_S, HAS_FILTER, BLOCK_M, BLOCK_N)
    if STATS:
        tl.store(div_ptr + split * N + rows, div, mask=row_ok)
        tl.store(ent_ptr + split * N + rows, ent, mask=row_ok)


def grad_arguments(
    hs, ws, bs, ht, wt, bt, lse_s, lse_t, coef, row_scale, opts: LossOptions, buffer: torch.Tensor, n_splits: int,
    filter_eps: float | None, hard: HardLabels | None = None, hard_lse: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
) -> dict:
    """Keyword arguments of ``grad_kernel`` writing into ``buffer`` (``(N, V_c)``, the head's dtype).

    The stripe bounds (``stripe0``, ``stripe_end``) start at the first stripe; ``launch_grad`` moves
    them. ``hard``: labels and per-row gradient scales of the cross-entropy; ``hard_lse`` its
    ``lse(T z)`` per row (read only at T != 1). Without ``hard`` every label argument is None
    (a constexpr), so the kernel's parameter list is the label-free one. ``stats``: a ``(2, n_splits, N)``
    fp32 output for the divergence and entropy partials (``STATS``), or None.
    """
    log_beta, log_1m_beta = jsd_logs(opts.beta)
    return {
        **head_arguments(hs, ws, bs, ht, wt, bt, opts, n_splits),
        "lse_s_ptr": lse_s, "lse_t_ptr": lse_t, "coef_ptr": coef, "row_scale_ptr": row_scale,
        "labels_ptr": None if hard is None else hard.labels, "hard_scale_ptr": None if hard is None else hard.scale,
        "lse_y_ptr": hard_lse if hard is not None and opts.temperature != 1.0 else None,
        "temperature": None if hard is None else opts.temperature,
        "g_ptr": buffer, "g_stride": buffer.shape[1], "stripe0": 0, "stripe_end": min(buffer.shape[1], opts.vocab_size),
        "div_ptr": None if stats is None else stats[0], "ent_ptr": None if stats is None else stats[1],
        "beta": opts.beta, "log_beta": log_beta, "log_1m_beta": log_1m_beta,
        "filter_eps": filter_eps or 0.0, "DIVERGENCE": divergence_code(opts.divergence, opts.beta),
    }


def launch_grad(
    student: Student, teacher: Student, lse_s, lse_t, coef, row_scale, opts: LossOptions, want: Want,
    config: BlockConfig, plan: StripePlan, filter_eps: float | None = None, hard: HardLabels | None = None,
    hard_lse: torch.Tensor | None = None, with_stats: bool = False,
) -> tuple[StudentGrads, tuple[torch.Tensor, torch.Tensor] | None]:
    """Gradients of ``sum_i row_scale_i D_i + hard.scale_i CE_i`` (``stripes.stripe_gradients``' dtypes), and
    with ``with_stats`` the per-row (divergence, entropy) summed from the same tiles."""
    n = student.hidden.shape[0]
    n_stripes = -(-opts.vocab_size // plan.width)
    stats = torch.zeros(n_stripes, 2, plan.splits, n, dtype=torch.float32, device=student.hidden.device) \
        if with_stats else None

    def kernel(buffer: torch.Tensor, start: int, stop: int) -> None:
        args = grad_arguments(*student, *teacher, lse_s, lse_t, coef, row_scale, opts, buffer, plan.splits,
                              filter_eps, hard, hard_lse, None if stats is None else stats[start // plan.width])
        args.update(stripe0=start, stripe_end=stop)
        grad_kernel[(triton.cdiv(n, config.block_m), plan.splits)](
            **args, **config.constexprs(), **config.launch_options())

    grads = stripe_gradients(student, opts.vocab_size, want, plan.width, kernel)
    return grads, None if stats is None else tuple(stats.sum((0, 2)))
