"""Pass 3: student gradients. Recompute each logit tile pair, form dL/dlogits in registers,
and push it through the two gradient GEMMs with fp32 atomics.

Per tile: ``g = row_scale (a - q c)`` (``a``, ``q`` from ``tile_terms``, ``c`` from pass 2),
chained through temperature, softcap (``1 - tanh^2``, recovered from the logits) and scale.
Then, streaming the student hidden size in ``BLOCK_K`` slices,
``grad_h[rows, k] += g @ W[cols, k]`` and ``grad_w[cols, k] += g^T @ h[rows, k]``, and
``grad_b[cols] += sum_rows g``.

Why atomics rather than a two-kernel scheme: a kernel that owns grad-hidden rows (looping
over the vocabulary) and a second that owns grad-weight rows (looping over tokens) would each
have to recompute *both* logit tiles; with the teacher usually the wider head (H_t = 2 H_s at
Liger's shape) that is ~1.6x the FLOPs of this pass. Atomics recompute once and never
materialize a ``chunk x V`` gradient. The price is atomic traffic (``N H_s V / BLOCK_N`` fp32
adds into grad-hidden plus ``V H_s N / BLOCK_M`` into grad-weight, relaxed fire-and-forget
reductions; see docs/performance.md) and run-to-run non-determinism of the fp32 sums at
rounding level.

Hard labels (``HAS_LABELS``) add ``h T (softmax(T z) - onehot(label))`` with ``h`` the row's
hard scale: at T = 1 the softmax part folds into the same register expression,
``s a - q (s c - h)`` (no extra exp); at T != 1 (``HARD_LSE``) it costs one exp per element
against the row's ``lse(T z)`` from pass 2.

Gradient filtering (``Tuning.grad_filter_eps``): a tile whose largest ``|g|`` is below ``eps``
skips its GEMMs and atomics entirely (``HAS_FILTER``): for peaked distributions most of the
vocabulary has ``q ~ p ~ 0`` and contributes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.call import LossOptions
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
    push_grad_tile,
    tile_terms,
)


@triton.heuristics({
    **HEAD_HEURISTICS,
    **LABEL_HEURISTICS,
    **GRAD_HEURISTICS,
})
@triton.jit
def grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, coef_ptr, row_scale_ptr,
    labels_ptr, hard_scale_ptr, lse_y_ptr, grad_h_ptr, grad_w_ptr, grad_b_ptr,
    N, K, HS, HT, n_splits, scale_s, scale_t, cap_s, cap_t, inv_temp, temperature, beta, log_beta, log_1m_beta,
    filter_eps,
    DIVERGENCE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_PRECISION_T: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr,
    EVEN_KS: tl.constexpr, EVEN_KT: tl.constexpr,
    HAS_LABELS: tl.constexpr, HARD_LSE: tl.constexpr,
    HAS_FILTER: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
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
    for vb in range(split, tl.cdiv(K, BLOCK_N), n_splits):
        z_s = head_tile(hs_ptr, ws_ptr, bs_ptr, pid_m * BLOCK_M, vb * BLOCK_N, N, K, HS, scale_s, cap_s, inv_temp,
                        HAS_BIAS_S, HAS_SOFTCAP_S, EVEN_KS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        z_t = head_tile(ht_ptr, wt_ptr, bt_ptr, pid_m * BLOCK_M, vb * BLOCK_N, N, K, HT, scale_t, cap_t, inv_temp,
                        HAS_BIAS_T, HAS_SOFTCAP_T, EVEN_KT, DOT_PRECISION_T, BLOCK_M, BLOCK_N, BLOCK_K)
        _value, a, q, _q_log_q = tile_terms(z_s, z_t, lse_s, lse_t, beta, log_beta, log_1m_beta, DIVERGENCE)
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
        push_grad_tile(g, z_s, live, hs_ptr, ws_ptr, grad_h_ptr, grad_w_ptr, grad_b_ptr, pid_m * BLOCK_M, vb * BLOCK_N,
                       N, K, HS, cap_s, inv_temp, scale_s, filter_eps, HAS_SOFTCAP_S, HAS_FILTER, NEED_H, NEED_W,
                       NEED_B, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


def grad_arguments(
    hs, ws, bs, ht, wt, bt, lse_s, lse_t, coef, row_scale, opts: LossOptions, want: tuple[bool, bool, bool],
    n_splits: int, filter_eps: float | None, hard: HardLabels | None = None, hard_lse: torch.Tensor | None = None,
) -> dict:
    """Keyword arguments of ``grad_kernel``; zeroed fp32 accumulators for the wanted gradients.

    ``hard``: labels and per-row gradient scales of the cross-entropy; ``hard_lse`` its
    ``lse(T z)`` per row (read only at T != 1). Without ``hard`` every label argument is None
    (a constexpr), so the kernel's parameter list is the label-free one.
    """
    acc = {"dtype": torch.float32, "device": hs.device}
    want_h, want_w, want_b = want
    log_beta, log_1m_beta = jsd_logs(opts.beta)
    return {
        **head_arguments(hs, ws, bs, ht, wt, bt, opts, n_splits),
        "lse_s_ptr": lse_s, "lse_t_ptr": lse_t, "coef_ptr": coef, "row_scale_ptr": row_scale,
        "labels_ptr": None if hard is None else hard.labels, "hard_scale_ptr": None if hard is None else hard.scale,
        "lse_y_ptr": hard_lse if hard is not None and opts.temperature != 1.0 else None,
        "temperature": None if hard is None else opts.temperature,
        "grad_h_ptr": torch.zeros(hs.shape, **acc) if want_h else None,
        "grad_w_ptr": torch.zeros(ws.shape, **acc) if want_w else None,
        "grad_b_ptr": torch.zeros(ws.shape[0], **acc) if want_b and bs is not None else None,
        "beta": opts.beta, "log_beta": log_beta, "log_1m_beta": log_1m_beta,
        "filter_eps": filter_eps or 0.0, "DIVERGENCE": divergence_code(opts.divergence, opts.beta),
    }


def launch_grad(
    hs, ws, bs, ht, wt, bt, lse_s, lse_t, coef, row_scale, opts: LossOptions, want: tuple[bool, bool, bool],
    config: BlockConfig, n_splits: int, filter_eps: float | None = None, hard: HardLabels | None = None,
    hard_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """fp32 (grad_h, grad_w, grad_b) of ``sum_i row_scale_i D_i + hard.scale_i CE_i``; None where not wanted."""
    args = grad_arguments(hs, ws, bs, ht, wt, bt, lse_s, lse_t, coef, row_scale, opts, want, n_splits, filter_eps,
                          hard, hard_lse)
    grid = (triton.cdiv(hs.shape[0], config.block_m), n_splits)
    if hs.shape[0]:  # an all-masked batch launches nothing
        grad_kernel[grid](**args, **config.constexprs(), **config.launch_options())
    return args["grad_h_ptr"], args["grad_w_ptr"], args["grad_b_ptr"]
