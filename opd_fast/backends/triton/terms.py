"""Pass 2: per-row divergence, gradient coefficient ``c`` and entropy, split over the vocabulary.

Two modes of one kernel (``ONLINE`` constexpr):

* **after pass 1** (JSD, TVD): with the full-row log-sum-exps every tile's ``q`` and ``p``
  are exact, so the row sums are plain fp32 additions.
* **one pass** (forward / reverse KL, no pass 1): the KLs and the entropy are linear in the
  logits under one softmax, ``KL(p||q) = E_p[z_t - z_s] - lse_t + lse_s`` and
  ``H(q) = lse_s - E_q[z_s]``, so the expectations ride along the online log-sum-exp with the
  same rescaling. This saves one of the three sweeps over ``V x (H_s + H_t)`` for the default
  divergence. ``c`` is then -1 (forward) or the KL itself (reverse).

Hard labels ride along whichever pass sweeps the student's online log-sum-exp: pass 1 after
which this kernel runs, or this kernel itself in one-pass mode (``HAS_LABELS``, ONLINE only).
That pass gathers each row's label logit from the tile that holds its column and, at T != 1
(``HARD_LSE``), sums ``exp(T z)`` against the student's running max; the cross-entropy
``lse(T z) - T z[label]`` is formed in the merge. At T = 1 ``lse(T z)`` is the student's own.

Either way each program ``(i, s)`` writes one partial per row and split; the merge over the
``n_splits`` partials is done in torch (``n_splits x N`` tensors: cheap). ``c`` (the row sum of
the gradient numerator ``a``, see ``backends/tile_math.py``) is what the gradient pass needs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...core.call import LossOptions
from .common import (
    FORWARD_KL,
    HEAD_HEURISTICS,
    LABEL_HEURISTICS,
    REVERSE_KL,
    BlockConfig,
    divergence_code,
    finish_lse,
    head_arguments,
    head_tile,
    jsd_logs,
    label_arguments,
    label_logit,
    merge_labels,
    online_step,
    scaled_lse_step,
    tile_terms,
)
from .lse import launch_lse


@triton.heuristics({
    **HEAD_HEURISTICS, **LABEL_HEURISTICS, "ONLINE": lambda args: args["DIVERGENCE"] in (FORWARD_KL, REVERSE_KL),
})
@triton.jit
def terms_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, div_ptr, coef_ptr, ent_ptr,
    labels_ptr, label_logit_ptr, lse_y_ptr,
    N, K, HS, HT, n_splits, scale_s, scale_t, cap_s, cap_t, inv_temp, temperature, beta, log_beta, log_1m_beta,
    DIVERGENCE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_PRECISION_T: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr,
    EVEN_KS: tl.constexpr, EVEN_KT: tl.constexpr, ONLINE: tl.constexpr,
    HAS_LABELS: tl.constexpr, HARD_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ONLINE: ``lse_*_ptr`` receive per-split partial LSEs, ``div_ptr`` / ``ent_ptr`` the split's
    softmax-weighted means of ``z_t - z_s`` (forward) or ``z_s - z_t`` (reverse) and of ``z_s``.
    HAS_LABELS (ONLINE only): ``label_logit_ptr`` receives the split's share of ``z[label]`` (0
    unless the label's tile is in the split), HARD_LSE: ``lse_y_ptr`` the split's partial LSE of ``T z``."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    out = split * N + rows
    div = tl.zeros((BLOCK_M,), tl.float32)
    coef = tl.zeros((BLOCK_M,), tl.float32)
    ent = tl.zeros((BLOCK_M,), tl.float32)
    if ONLINE:
        m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        sum_s = tl.zeros((BLOCK_M,), tl.float32)
        sum_t = tl.zeros((BLOCK_M,), tl.float32)
    else:
        lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
        lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
    tl.static_assert(ONLINE or not HAS_LABELS, "after pass 1 the labels came with pass 1")
    if HAS_LABELS:
        z_label = tl.zeros((BLOCK_M,), tl.float32)
    if HARD_LSE:
        sum_y = tl.zeros((BLOCK_M,), tl.float32)
    for vb in range(split, tl.cdiv(K, BLOCK_N), n_splits):
        z_s = head_tile(hs_ptr, ws_ptr, bs_ptr, pid_m * BLOCK_M, vb * BLOCK_N, N, K, HS, scale_s, cap_s, inv_temp,
                        HAS_BIAS_S, HAS_SOFTCAP_S, EVEN_KS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        z_t = head_tile(ht_ptr, wt_ptr, bt_ptr, pid_m * BLOCK_M, vb * BLOCK_N, N, K, HT, scale_t, cap_t, inv_temp,
                        HAS_BIAS_T, HAS_SOFTCAP_T, EVEN_KT, DOT_PRECISION_T, BLOCK_M, BLOCK_N, BLOCK_K)
        if ONLINE:
            m_prev = m_s
            m_s, alpha_s, e_s = online_step(m_s, z_s)
            if HAS_LABELS:
                z_label += label_logit(z_s, labels_ptr, rows, row_ok, vb * BLOCK_N, BLOCK_N)
            if HARD_LSE:
                sum_y = scaled_lse_step(sum_y, m_prev, m_s, z_s, temperature)
            m_t, alpha_t, e_t = online_step(m_t, z_t)
            sum_s = sum_s * alpha_s + tl.sum(e_s, 1)
            sum_t = sum_t * alpha_t + tl.sum(e_t, 1)
            ent = ent * alpha_s + tl.sum(tl.where(e_s == 0, 0.0, e_s * z_s), 1)
            if DIVERGENCE == 0:
                div = div * alpha_t + tl.sum(tl.where(e_t == 0, 0.0, e_t * (z_t - z_s)), 1)
            else:
                div = div * alpha_s + tl.sum(tl.where(e_s == 0, 0.0, e_s * (z_s - z_t)), 1)
        else:
            value, a, _q, q_log_q = tile_terms(z_s, z_t, lse_s, lse_t, beta, log_beta, log_1m_beta, DIVERGENCE)
            div += tl.sum(value, 1)
            coef += tl.sum(a, 1)
            ent -= tl.sum(q_log_q, 1)
    if ONLINE:
        norm = sum_t if DIVERGENCE == 0 else sum_s
        div = tl.where(norm == 0, 0.0, div / norm)  # == 0, not > 0: a NaN sum (a NaN input) passes
        ent = tl.where(sum_s == 0, 0.0, ent / sum_s)
        tl.store(lse_s_ptr + out, finish_lse(m_s, sum_s), mask=row_ok)
        tl.store(lse_t_ptr + out, finish_lse(m_t, sum_t), mask=row_ok)
    tl.store(div_ptr + out, div, mask=row_ok)
    tl.store(coef_ptr + out, coef, mask=row_ok)
    tl.store(ent_ptr + out, ent, mask=row_ok)
    if HAS_LABELS:
        tl.store(label_logit_ptr + out, z_label, mask=row_ok)
    if HARD_LSE:
        tl.store(lse_y_ptr + out, finish_lse(m_s * temperature, sum_y), mask=row_ok)


class RowStats(NamedTuple):
    """Per-row outputs of the statistics passes, fp32 ``(N,)`` each."""

    student_lse: torch.Tensor
    teacher_lse: torch.Tensor
    divergence: torch.Tensor
    coef: torch.Tensor  # c, the row sum of the gradient numerator
    entropy: torch.Tensor
    cross_entropy: torch.Tensor | None = None  # with labels: lse(T z) - T z[label], 0 without a label
    hard_lse: torch.Tensor | None = None  # with labels: lse(T z), what the gradient pass needs


def terms_arguments(
    hs, ws, bs, ht, wt, bt, lse_s, lse_t, opts: LossOptions, n_splits: int, labels: torch.Tensor | None = None
) -> dict:
    """Keyword arguments of ``terms_kernel``; ``lse_s`` / ``lse_t`` None: one-pass mode outputs.

    ``labels`` (int64 ``(N,)``, -1 = none; one-pass mode only): also the label partials.
    """
    partial = torch.empty((5 if labels is None else 7, n_splits, hs.shape[0]), dtype=torch.float32, device=hs.device)
    log_beta, log_1m_beta = jsd_logs(opts.beta)
    return {
        **head_arguments(hs, ws, bs, ht, wt, bt, opts, n_splits),
        "lse_s_ptr": partial[3] if lse_s is None else lse_s, "lse_t_ptr": partial[4] if lse_t is None else lse_t,
        "div_ptr": partial[0], "coef_ptr": partial[1], "ent_ptr": partial[2],
        **label_arguments(labels, opts, None if labels is None else partial[5:]),
        "beta": opts.beta, "log_beta": log_beta, "log_1m_beta": log_1m_beta,
        "DIVERGENCE": divergence_code(opts.divergence, opts.beta),
    }


def _merge_online(args: dict) -> RowStats:
    """Combine one-pass partials: LSEs by logsumexp, softmax-weighted means by their split's mass."""
    part_s, part_t = args["lse_s_ptr"], args["lse_t_ptr"]
    lse_s, lse_t = torch.logsumexp(part_s, 0), torch.logsumexp(part_t, 0)
    mass = lambda part, lse: torch.where(part == float("-inf"), 0.0, (part - lse).exp())
    w_s, w_t = mass(part_s, lse_s), mass(part_t, lse_t)
    entropy = lse_s - (w_s * args["ent_ptr"]).sum(0)
    if args["DIVERGENCE"] == FORWARD_KL:
        div = (w_t * args["div_ptr"]).sum(0) - lse_t + lse_s
        coef = torch.full_like(div, -1.0)
    else:
        div = (w_s * args["div_ptr"]).sum(0) - lse_s + lse_t
        coef = div
    return RowStats(lse_s, lse_t, div, coef, entropy, *merge_labels(args, lse_s))


def launch_row_stats(
    hs, ws, bs, ht, wt, bt, opts: LossOptions, lse_launch: tuple[BlockConfig, int],
    terms_launch: tuple[BlockConfig, int], labels: torch.Tensor | None = None, teacher_lse: torch.Tensor | None = None,
) -> RowStats:
    """Per-row statistics (and with ``labels`` the cross-entropy at temperature 1).

    One sweep for the KLs, two (pass 1, then this kernel) for JSD and TVD; with ``teacher_lse``
    pass 1 sweeps the student alone. (The one-pass KL sweeps both heads whatever is known.)
    ``*_launch``: each kernel's (block config, vocabulary splits).
    """
    online = divergence_code(opts.divergence, opts.beta) in (FORWARD_KL, REVERSE_KL)
    first = (None,) * 4 if online else launch_lse(hs, ws, bs, ht, wt, bt, opts, *lse_launch, labels, teacher_lse)
    config, n_splits = terms_launch
    args = terms_arguments(hs, ws, bs, ht, wt, bt, *first[:2], opts, n_splits, labels if online else None)
    grid = (triton.cdiv(hs.shape[0], config.block_m), n_splits)
    if hs.shape[0]:  # an all-masked batch launches nothing
        terms_kernel[grid](**args, **config.constexprs(), **config.launch_options())
    if online:
        return _merge_online(args)
    return RowStats(*first[:2], args["div_ptr"].sum(0), args["coef_ptr"].sum(0), args["ent_ptr"].sum(0), *first[2:])
