"""Pass 1: per-row log-sum-exp of the student and teacher logits, split over the vocabulary.

Grid ``(cdiv(N, BLOCK_M), n_splits)``: program ``(i, s)`` streams the vocabulary blocks
``s, s + n_splits, ...`` for one block of rows, keeping an online (max, sum-exp) per side in
registers, and writes one partial LSE per row and split. The merge is a ``logsumexp`` over
the ``n_splits`` partials (an ``n_splits x N`` tensor): cheap, and it lets a small batch fill
the GPU by raising ``n_splits``. The two logit tiles are produced one after the other, so
only one ``BLOCK_M x BLOCK_N`` fp32 accumulator is live at a time.

With hard labels (``HAS_LABELS``) the student's sweep also gathers each row's label logit and,
at T != 1 (``HARD_LSE``), sums ``exp(T z)`` against the student's running max: the
cross-entropy's ``lse(T z)`` without a second max.

A teacher log-sum-exp the caller already has (``teacher_lse=``) switches the teacher's sweep off
(``HAS_TEACHER`` False): the pass then costs the student's GEMM alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.call import LossOptions
from .common import (
    HEAD_HEURISTICS,
    LABEL_HEURISTICS,
    BlockConfig,
    finish_lse,
    head_arguments,
    head_tile,
    label_arguments,
    label_logit,
    merge_labels,
    online_lse,
    scaled_lse_step,
)


@triton.heuristics({**HEAD_HEURISTICS, **LABEL_HEURISTICS, "HAS_TEACHER": lambda args: args["lse_t_ptr"] is not None})
@triton.jit
def lse_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, labels_ptr, label_logit_ptr, lse_y_ptr,
    N, K, HS, HT, n_splits, scale_s, scale_t, cap_s, cap_t, inv_temp, temperature,
    DOT_PRECISION: tl.constexpr, DOT_PRECISION_T: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr,
    EVEN_KS: tl.constexpr, EVEN_KT: tl.constexpr, HAS_LABELS: tl.constexpr, HARD_LSE: tl.constexpr,
    HAS_TEACHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    sum_s = tl.zeros((BLOCK_M,), tl.float32)
    sum_t = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_LABELS:
        z_label = tl.zeros((BLOCK_M,), tl.float32)
    if HARD_LSE:
        sum_y = tl.zeros((BLOCK_M,), tl.float32)
    for vb in range(split, tl.cdiv(K, BLOCK_N), n_splits):
        z = head_tile(hs_ptr, ws_ptr, bs_ptr, pid_m * BLOCK_M, vb * BLOCK_N, N, K, HS, scale_s, cap_s, inv_temp,
                      HAS_BIAS_S, HAS_SOFTCAP_S, EVEN_KS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        m_prev = m_s
        m_s, sum_s = online_lse(m_s, sum_s, z)
        if HAS_LABELS:
            z_label += label_logit(z, labels_ptr, rows, rows < N, vb * BLOCK_N, BLOCK_N)
        if HARD_LSE:
            sum_y = scaled_lse_step(sum_y, m_prev, m_s, z, temperature)
        if HAS_TEACHER:
            z = head_tile(ht_ptr, wt_ptr, bt_ptr, pid_m * BLOCK_M, vb * BLOCK_N, N, K, HT, scale_t, cap_t, inv_temp,
                          HAS_BIAS_T, HAS_SOFTCAP_T, EVEN_KT, DOT_PRECISION_T, BLOCK_M, BLOCK_N, BLOCK_K)
            m_t, sum_t = online_lse(m_t, sum_t, z)
    out = split * N + rows
    tl.store(lse_s_ptr + out, finish_lse(m_s, sum_s), mask=rows < N)
    if HAS_TEACHER:
        tl.store(lse_t_ptr + out, finish_lse(m_t, sum_t), mask=rows < N)
    if HAS_LABELS:
        tl.store(label_logit_ptr + out, z_label, mask=rows < N)
    if HARD_LSE:
        tl.store(lse_y_ptr + out, finish_lse(m_s * temperature, sum_y), mask=rows < N)


def lse_arguments(hs, ws, bs, ht, wt, bt, opts: LossOptions, n_splits: int, labels: torch.Tensor | None = None,
                  teacher: bool = True) -> dict:
    """Keyword arguments of ``lse_kernel`` (outputs allocated on ``hs``'s device); ``labels``: int64, -1 = none;
    ``teacher`` False: the student's sweep alone."""
    partial = torch.empty((2 if labels is None else 4, n_splits, hs.shape[0]), dtype=torch.float32, device=hs.device)
    return {
        **head_arguments(hs, ws, bs, ht, wt, bt, opts, n_splits), "lse_s_ptr": partial[0],
        "lse_t_ptr": partial[1] if teacher else None,
        **label_arguments(labels, opts, None if labels is None else partial[2:]),
    }


def launch_lse(
    hs, ws, bs, ht, wt, bt, opts: LossOptions, config: BlockConfig, n_splits: int, labels: torch.Tensor | None = None,
    teacher_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Full-row (student_lse, teacher_lse, cross_entropy, lse(T z)), fp32 ``(N,)`` each; the last two
    None without ``labels``. A given ``teacher_lse`` is returned as it is, the teacher left unswept."""
    args = lse_arguments(hs, ws, bs, ht, wt, bt, opts, n_splits, labels, teacher=teacher_lse is None)
    grid = (triton.cdiv(hs.shape[0], config.block_m), n_splits)
    if hs.shape[0]:  # an all-masked batch launches nothing
        lse_kernel[grid](**args, **config.constexprs(), **config.launch_options())
    lse_s = torch.logsumexp(args["lse_s_ptr"], 0)
    lse_t = torch.logsumexp(args["lse_t_ptr"], 0) if teacher_lse is None else teacher_lse
    return lse_s, lse_t, *merge_labels(args, lse_s)
