"""Cached mode: each head's logits computed once per token chunk, one Triton row kernel for the rest.

``Tuning(triton_mode="cached")`` runs the Triton backend as the chunk loop of ``chunked.py``: per
token chunk ``cached_logits``' GEMM kernel writes each head's logits as an fp16 tile-shifted cache
(16-bit inputs; fp32 inputs get torch matmul's fp32 logits, exact), this kernel turns them into every
per-row statistic and writes the logit gradient over the student's cache, and the chunk loop's
``GradSink`` runs grad-hidden and grad-weight (fp32 accumulation) on cuBLAS. FLOPs are the GEMM floor
(no logit is computed twice); the price is 4 bytes per logit of a chunk for 16-bit inputs (8 for fp32),
sized by ``Tuning.memory_budget_mb``. Precision: ``cached_logits``' module docstring.

The kernel is memory-bound: program ``i`` owns ``BLOCK_R`` rows and streams them in ``BLOCK_V``
columns: (1) both log-sum-exps, from the caches' per-tile statistics (``V / TILE_N`` values a row) or,
for fp32 logits and for the student at T != 1 with labels (which needs the log-sum-exp of ``T z``),
online over the logits (+ the label logit), (2) the divergence, ``c`` and the entropy with the row
LSEs known, (3) with a gradient, ``g = s (a - q c)`` (+ the cross-entropy's), chained through softcap
and temperature, stored into the gradient buffer. Logits are reconstructed in fp32 (``m + v``) as they
are read; the element-wise math is ``common``'s, the one the strict kernels use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...core.call import HeadSpec, LossOptions
from ..chunked import Head
from ..tile_math import HardLabels, RowTerms
from .cached_logits import ShiftedLogits, cache_dtype, shifted_logits
from .common import (
    INTERPRET,
    divergence_code,
    finish_lse,
    jsd_logs,
    label_hit,
    label_logit,
    online_lse,
    scaled_lse_step,
    tanh,
    tile_terms,
)


@dataclass(frozen=True)
class RowBlocks:
    """The row kernel's launch config: rows per program, columns per step, warps."""

    block_r: int
    block_v: int
    num_warps: int

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_R": self.block_r, "BLOCK_V": self.block_v}

    def launch_options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": 1}

    def label(self) -> str:
        return f"{self.block_r}x{self.block_v} w{self.num_warps}"


# One row per program, 4096 columns per step and 8 warps: 16-byte accesses, enough bytes in flight
# per SM for a memory-bound pass (what `opd-fast kernels check` compiles). The interpreter gets
# small blocks so tests stay fast.
GPU_BLOCKS = RowBlocks(1, 4096, 8)
_INTERPRETER_BLOCKS = RowBlocks(4, 32, 1)


@triton.jit
def _final(ptr, stats_ptr, stride, n_tiles, rows, row_ok, cols, n_cols, cap, inv_temp,
           HAS_SOFTCAP: tl.constexpr, SHIFTED: tl.constexpr, TILE_N: tl.constexpr):
    """fp32 final logits ``softcap(raw) / T`` of a ``(rows, cols)`` block; -inf past the row's columns.

    ``SHIFTED``: the cache holds fp16 ``raw - m`` per tile of ``TILE_N`` columns, ``stats_ptr`` the shifts ``m``.
    """
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    at = tl.cast(rows, tl.int64)[:, None]
    z = tl.load(ptr + at * stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if SHIFTED:
        z += tl.load(stats_ptr + at * n_tiles + (cols // TILE_N)[None, :], mask=ok, other=0.0)
    if HAS_SOFTCAP:
        z = cap * tanh(z / cap)
    return tl.where(ok, z * inv_temp, float("-inf"))


@triton.jit
def _merge_tiles(stats_ptr, N, n_tiles, rows, row_ok, t0, m, total, cap, inv_temp,
                 HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Fold tiles ``t0:t0 + BLOCK_V`` of a cache's statistics into a running (max, sum of exp) per row.

    A tile's final max is ``softcap(m) / T`` of its shift; a tile whose sum is 0 (every logit -inf) has none.
    """
    ts = t0 + tl.arange(0, BLOCK_V)
    ok = row_ok[:, None] & (ts < n_tiles)[None, :]
    at = stats_ptr + tl.cast(rows, tl.int64)[:, None] * n_tiles + ts[None, :]
    shift = tl.load(at, mask=ok, other=0.0)
    tile_sum = tl.load(at + tl.cast(N, tl.int64) * n_tiles, mask=ok, other=0.0)
    if HAS_SOFTCAP:
        shift = cap * tanh(shift / cap)
    top = tl.where(tile_sum == 0, float("-inf"), shift * inv_temp)
    m_new = tl.maximum(m, tl.max(top, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, total * tl.exp(m - m_safe) + tl.sum(tile_sum * tl.exp(top - m_safe[:, None]), 1)


@triton.jit
def _label_final(ptr, stats_ptr, stride, n_tiles, labels_ptr, rows, row_ok, cap, inv_temp,
                 HAS_SOFTCAP: tl.constexpr, SHIFTED: tl.constexpr, TILE_N: tl.constexpr):
    """Each row's final logit at its label (0 for a row without one), read from the cache directly."""
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    has = row_ok & (labels >= 0)
    column = tl.where(has, labels, 0)
    at = tl.cast(rows, tl.int64)
    z = tl.load(ptr + at * stride + column, mask=has, other=0.0).to(tl.float32)
    if SHIFTED:
        z += tl.load(stats_ptr + at * n_tiles + column // TILE_N, mask=has, other=0.0)
    if HAS_SOFTCAP:
        z = cap * tanh(z / cap)
    return tl.where(has, z * inv_temp, 0.0)


@triton.heuristics({
    "HAS_SOFTCAP_S": lambda args: args["cap_s"] > 0,
    "HAS_SOFTCAP_T": lambda args: args["cap_t"] > 0,
    "HAS_LABELS": lambda args: args["labels_ptr"] is not None,
    "HARD_LSE": lambda args: args["labels_ptr"] is not None and args["temperature"] != 1.0,
    "GRAD": lambda args: args["row_scale_ptr"] is not None,
    "SHIFTED_S": lambda args: args["stats_s_ptr"] is not None,
    "SHIFTED_T": lambda args: args["stats_t_ptr"] is not None,
    # The student's LSE from its tile statistics, unless the CE needs the log-sum-exp of T z (labels, T != 1).
    "TILE_STATS_S": lambda args: args["stats_s_ptr"] is not None and not (
        args["labels_ptr"] is not None and args["temperature"] != 1.0),
})
@triton.jit
def cached_rows_kernel(
    raw_s_ptr, raw_t_ptr, stats_s_ptr, stats_t_ptr, stride_s, stride_t, n_tiles, grad_ptr, stride_g, row_scale_ptr,
    labels_ptr, hard_scale_ptr, out_ptr, N, K, cap_s, cap_t, inv_temp, temperature, beta, log_beta, log_1m_beta,
    DIVERGENCE: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr,
    HAS_LABELS: tl.constexpr, HARD_LSE: tl.constexpr, GRAD: tl.constexpr,
    SHIFTED_S: tl.constexpr, SHIFTED_T: tl.constexpr, TILE_STATS_S: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``out_ptr``: ``(6, N)`` fp32 rows: divergence, c, entropy, student LSE, teacher LSE, cross-entropy.

    A head's cache is fp32 raw logits, or (``SHIFTED_*``) the fp16 tile-shifted cache of ``cached_logits`` with
    its ``(2, N, n_tiles)`` statistics, from which pass 1 takes the head's LSE without reading its logits (the
    student's streams anyway at T != 1 with labels: the log-sum-exp of ``T z`` has no tile statistics).
    ``grad_ptr`` (with a gradient): row ``i``'s ``K`` gradient entries go to ``grad_ptr + i * stride_g``, either
    over the student's cache (read just before, same size) or into a buffer of the student's 16-bit dtype.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    m_s = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    sum_s = tl.zeros((BLOCK_R,), tl.float32)
    sum_t = tl.zeros((BLOCK_R,), tl.float32)
    if HAS_LABELS:
        z_label = tl.zeros((BLOCK_R,), tl.float32)
    if HARD_LSE:
        sum_y = tl.zeros((BLOCK_R,), tl.float32)
    if TILE_STATS_S:
        for t0 in range(0, n_tiles, BLOCK_V):
            m_s, sum_s = _merge_tiles(stats_s_ptr, N, n_tiles, rows, row_ok, t0, m_s, sum_s, cap_s, inv_temp,
                                      HAS_SOFTCAP_S, BLOCK_V)
        if HAS_LABELS:
            z_label = _label_final(raw_s_ptr, stats_s_ptr, stride_s, n_tiles, labels_ptr, rows, row_ok, cap_s,
                                   inv_temp, HAS_SOFTCAP_S, SHIFTED_S, TILE_N)
    if SHIFTED_T:
        for t0 in range(0, n_tiles, BLOCK_V):
            m_t, sum_t = _merge_tiles(stats_t_ptr, N, n_tiles, rows, row_ok, t0, m_t, sum_t, cap_t, inv_temp,
                                      HAS_SOFTCAP_T, BLOCK_V)
    if not (TILE_STATS_S and SHIFTED_T):
        for v0 in range(0, K, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            if not TILE_STATS_S:
                z_s = _final(raw_s_ptr, stats_s_ptr, stride_s, n_tiles, rows, row_ok, cols, K, cap_s, inv_temp,
                             HAS_SOFTCAP_S, SHIFTED_S, TILE_N)
                m_prev = m_s
                m_s, sum_s = online_lse(m_s, sum_s, z_s)
                if HAS_LABELS:
                    z_label += label_logit(z_s, labels_ptr, rows, row_ok, v0, BLOCK_V)
                if HARD_LSE:
                    sum_y = scaled_lse_step(sum_y, m_prev, m_s, z_s, temperature)
            if not SHIFTED_T:
                z_t = _final(raw_t_ptr, stats_t_ptr, stride_t, n_tiles, rows, row_ok, cols, K, cap_t, inv_temp,
                             HAS_SOFTCAP_T, SHIFTED_T, TILE_N)
                m_t, sum_t = online_lse(m_t, sum_t, z_t)
    lse_s = finish_lse(m_s, sum_s)
    lse_t = finish_lse(m_t, sum_t)
    div = tl.zeros((BLOCK_R,), tl.float32)
    coef = tl.zeros((BLOCK_R,), tl.float32)
    ent = tl.zeros((BLOCK_R,), tl.float32)
    for v0 in range(0, K, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z_s = _final(raw_s_ptr, stats_s_ptr, stride_s, n_tiles, rows, row_ok, cols, K, cap_s, inv_temp,
                     HAS_SOFTCAP_S, SHIFTED_S, TILE_N)
        z_t = _final(raw_t_ptr, stats_t_ptr, stride_t, n_tiles, rows, row_ok, cols, K, cap_t, inv_temp,
                     HAS_SOFTCAP_T, SHIFTED_T, TILE_N)
        value, a, _q, q_log_q = tile_terms(z_s, z_t, lse_s, lse_t, beta, log_beta, log_1m_beta, DIVERGENCE)
        div += tl.sum(value, 1)
        coef += tl.sum(a, 1)
        ent -= tl.sum(q_log_q, 1)
    ce = tl.zeros((BLOCK_R,), tl.float32)
    if HAS_LABELS:
        lse_y = lse_s
        if HARD_LSE:
            lse_y = finish_lse(m_s * temperature, sum_y)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        ce = tl.where(labels >= 0, lse_y - z_label * temperature, 0.0)
    tl.store(out_ptr + rows, div, mask=row_ok)
    tl.store(out_ptr + N + rows, coef, mask=row_ok)
    tl.store(out_ptr + 2 * N + rows, ent, mask=row_ok)
    tl.store(out_ptr + 3 * N + rows, lse_s, mask=row_ok)
    tl.store(out_ptr + 4 * N + rows, lse_t, mask=row_ok)
    tl.store(out_ptr + 5 * N + rows, ce, mask=row_ok)
    if GRAD:
        row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
        if HAS_LABELS:
            hard = tl.load(hard_scale_ptr + rows, mask=row_ok, other=0.0)
        for v0 in range(0, K, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z_s = _final(raw_s_ptr, stats_s_ptr, stride_s, n_tiles, rows, row_ok, cols, K, cap_s, inv_temp,
                         HAS_SOFTCAP_S, SHIFTED_S, TILE_N)
            z_t = _final(raw_t_ptr, stats_t_ptr, stride_t, n_tiles, rows, row_ok, cols, K, cap_t, inv_temp,
                         HAS_SOFTCAP_T, SHIFTED_T, TILE_N)
            _value, a, q, _q_log_q = tile_terms(z_s, z_t, lse_s, lse_t, beta, log_beta, log_1m_beta, DIVERGENCE)
            if HARD_LSE:  # s (a - q c) / T + h (softmax(T z) - onehot): the CE's own softmax
                g = (a - q * coef[:, None]) * (row_scale * inv_temp)[:, None] + hard[:, None] * tl.exp(
                    z_s * temperature - lse_y[:, None])
            elif HAS_LABELS:  # T = 1: s a - q (s c - h), the CE's softmax is q
                g = a * row_scale[:, None] - q * (row_scale * coef - hard)[:, None]
            else:
                g = (a - q * coef[:, None]) * (row_scale * inv_temp)[:, None]
            if HAS_LABELS:
                g -= tl.where(label_hit(labels_ptr, rows, row_ok, v0, BLOCK_V), hard[:, None], 0.0)
            if HAS_SOFTCAP_S:
                t = z_s * (1.0 / (cap_s * inv_temp))  # inf where z is -inf: the select below zeroes those
                g = g * (1.0 - t * t)
            ok = row_ok[:, None] & (cols < K)[None, :]
            g = tl.where(ok & (z_s != float("-inf")), g, 0.0)
            ptrs = grad_ptr + tl.cast(rows, tl.int64)[:, None] * stride_g + cols[None, :]
            tl.store(ptrs, g.to(grad_ptr.dtype.element_ty), mask=ok)


Cache = torch.Tensor | ShiftedLogits  # a head's full-row logits: fp32 raw logits or the fp16 tile-shifted cache


def _cache_parts(cache: Cache) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(values, statistics or None, tile width) of a head's cache."""
    if isinstance(cache, ShiftedLogits):
        return cache.values, cache.stats, cache.tile_n
    return cache, None, 1


def cached_rows_arguments(cache_s: Cache, cache_t: Cache, opts: LossOptions, row_scale: torch.Tensor | None,
                          hard: HardLabels | None, grad: torch.Tensor) -> dict:
    """Keyword arguments of ``cached_rows_kernel`` (``row_scale`` None: no gradient) and a zeroed ``(6, n)``
    output; ``grad`` receives the gradient (it may be the student's cache itself)."""
    (raw_s, stats_s, tile_s), (raw_t, stats_t, tile_t) = _cache_parts(cache_s), _cache_parts(cache_t)
    if stats_s is not None and stats_t is not None and (tile_s, stats_s.shape) != (tile_t, stats_t.shape):
        raise ValueError(f"the heads' logit caches have different tiles: {tile_s} and {tile_t} columns")
    n, k = raw_s.shape
    stats = stats_s if stats_s is not None else stats_t
    log_beta, log_1m_beta = jsd_logs(opts.beta)
    with_hard_grad = hard is not None and row_scale is not None
    return {
        "raw_s_ptr": raw_s, "raw_t_ptr": raw_t, "stats_s_ptr": stats_s, "stats_t_ptr": stats_t,
        "stride_s": raw_s.stride(0), "stride_t": raw_t.stride(0), "n_tiles": 1 if stats is None else stats.shape[-1],
        "grad_ptr": grad, "stride_g": grad.stride(0),
        "row_scale_ptr": row_scale, "labels_ptr": None if hard is None else hard.labels.contiguous(),
        "hard_scale_ptr": hard.scale.float().contiguous() if with_hard_grad else None,
        "out_ptr": torch.zeros(6, n, dtype=torch.float32, device=raw_s.device),
        "N": n, "K": k, "cap_s": opts.student.softcap or 0.0, "cap_t": opts.teacher.softcap or 0.0,
        "inv_temp": 1.0 / opts.temperature, "temperature": opts.temperature, "beta": opts.beta,
        "log_beta": log_beta, "log_1m_beta": log_1m_beta, "DIVERGENCE": divergence_code(opts.divergence, opts.beta),
        "TILE_N": tile_s if stats_s is not None else tile_t,
    }


class TritonTileMath:
    """``chunked.TileMath`` on the Triton row kernel, and its ``chunked.RowLogits``: the cached mode."""

    def live_bytes_per_logit(self, dtype: torch.dtype) -> int:
        """The two heads' caches (fp16 shifted for 16-bit inputs, fp32 for fp32 ones); the gradient is written
        over the student's, which has its size."""
        return 2 * cache_dtype(dtype).itemsize

    def logits_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """fp32 (or wider): what the torch GEMMs write when the chunk loop computes the logits itself (the
        vocabulary-tiled regime of tiny budgets)."""
        return torch.promote_types(dtype, torch.float32)

    def buffer_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The full-row regime's cache element: fp16 for 16-bit inputs, fp32 for fp32 ones."""
        return cache_dtype(dtype)

    def head_logits(self, h: torch.Tensor, head: Head, spec: HeadSpec, temperature: float, vocab: int,
                    buffer: torch.Tensor) -> Cache:
        """A head's cache of the chunk ``h``: the tile-shifted fp16 one from ``cached_logits`` for 16-bit inputs,
        the torch GEMM's fp32 logits for fp32 ones (exact, as in the strict kernels)."""
        if h.dtype in (torch.float16, torch.bfloat16):
            return shifted_logits(h, head, spec, temperature, vocab, buffer)
        return head.logits(h, 0, vocab, buffer)

    def full_rows(
        self, raw_s: Cache, raw_t: Cache, opts: LossOptions, row_scale: torch.Tensor | None,
        hard: HardLabels | None = None,
        grad_dtype: torch.dtype | None = None,
    ) -> tuple[RowTerms, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``TileMath.full_rows`` on the heads' caches; the gradient comes back in ``grad_dtype`` (default the
        cache's), written over the student's cache (the same element size: fp32 over fp32, 16-bit over fp16)."""
        values = _cache_parts(raw_s)[0]
        n = values.shape[0]
        grad = row_scale is not None
        out = values if grad_dtype is None else values.view(grad_dtype)
        args = cached_rows_arguments(raw_s, raw_t, opts, row_scale.float().contiguous() if grad else None, hard, out)
        blocks = _INTERPRETER_BLOCKS if INTERPRET else GPU_BLOCKS
        if n:
            cached_rows_kernel[(triton.cdiv(n, blocks.block_r),)](
                **args, **blocks.constexprs(), **blocks.launch_options())
        divergence, coef, entropy, lse_s, lse_t, ce = args["out_ptr"]
        return RowTerms(divergence, coef, entropy, None if hard is None else ce), lse_s, lse_t, out if grad else None
