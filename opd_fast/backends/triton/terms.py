"""Pass 2: per-row divergence, gradient coefficient ``c`` and entropy, split over the vocabulary.

With the full-row log-sum-exps of pass 1, every tile's ``q`` and ``p`` are exact, so the
row sums are plain additions: each program ``(i, s)`` accumulates its vocabulary blocks in
fp32 registers and writes one partial per row and split; the merge is a sum over splits.
``c`` (the row sum of the gradient numerator ``a``, see ``backends/tile_math.py``) is what
the gradient pass needs to form ``a - q c`` tile by tile without another sweep.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...validation import LossOptions
from .common import HEAD_HEURISTICS, BlockConfig, divergence_code, head_arguments, head_tile, jsd_logs, tile_terms


@triton.heuristics(HEAD_HEURISTICS)
@triton.jit
def terms_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, div_ptr, coef_ptr, ent_ptr,
    N, K, HS, HT, n_splits, scale_s, scale_t, cap_s, cap_t, inv_temp, beta, log_beta, log_1m_beta,
    DIVERGENCE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_PRECISION_T: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr,
    EVEN_KS: tl.constexpr, EVEN_KT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
    div = tl.zeros((BLOCK_M,), tl.float32)
    coef = tl.zeros((BLOCK_M,), tl.float32)
    neg_ent = tl.zeros((BLOCK_M,), tl.float32)
    for vb in range(split, tl.cdiv(K, BLOCK_N), n_splits):
        cols = vb * BLOCK_N + tl.arange(0, BLOCK_N)
        z_s = head_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, N, K, HS, scale_s, cap_s, inv_temp,
                        HAS_BIAS_S, HAS_SOFTCAP_S, EVEN_KS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        z_t = head_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, N, K, HT, scale_t, cap_t, inv_temp,
                        HAS_BIAS_T, HAS_SOFTCAP_T, EVEN_KT, DOT_PRECISION_T, BLOCK_M, BLOCK_N, BLOCK_K)
        value, a, _q, q_log_q = tile_terms(z_s, z_t, lse_s, lse_t, beta, log_beta, log_1m_beta, DIVERGENCE)
        div += tl.sum(value, 1)
        coef += tl.sum(a, 1)
        neg_ent += tl.sum(q_log_q, 1)
    out = split * N + rows
    tl.store(div_ptr + out, div, mask=row_ok)
    tl.store(coef_ptr + out, coef, mask=row_ok)
    tl.store(ent_ptr + out, -neg_ent, mask=row_ok)


def terms_arguments(hs, ws, bs, ht, wt, bt, lse_s, lse_t, opts: LossOptions, n_splits: int) -> dict:
    """Keyword arguments of ``terms_kernel`` (partial outputs allocated on ``hs``'s device)."""
    partial = torch.empty((3, n_splits, hs.shape[0]), dtype=torch.float32, device=hs.device)
    log_beta, log_1m_beta = jsd_logs(opts.beta)
    return {
        **head_arguments(hs, ws, bs, ht, wt, bt, opts, n_splits),
        "lse_s_ptr": lse_s, "lse_t_ptr": lse_t, "div_ptr": partial[0], "coef_ptr": partial[1], "ent_ptr": partial[2],
        "beta": opts.beta, "log_beta": log_beta, "log_1m_beta": log_1m_beta,
        "DIVERGENCE": divergence_code(opts.divergence, opts.beta),
    }  # fmt: skip


def launch_terms(hs, ws, bs, ht, wt, bt, lse_s, lse_t, opts: LossOptions, config: BlockConfig, n_splits: int):
    """Per-row (divergence, coefficient c, student entropy), fp32 ``(N,)`` each."""
    args = terms_arguments(hs, ws, bs, ht, wt, bt, lse_s, lse_t, opts, n_splits)
    grid = (triton.cdiv(hs.shape[0], config.block_m), n_splits)
    if hs.shape[0]:  # an all-masked batch launches nothing
        terms_kernel[grid](**args, **config.constexprs(), **config.launch_options())
    return args["div_ptr"].sum(0), args["coef_ptr"].sum(0), args["ent_ptr"].sum(0)
