"""Single-head forward: per-row log-sum-exp of the logits *outside* a per-row id set, and the ids' logits.

For the per-token log-probs (ids: the token) and the top-k teacher loss (ids: the teacher's top-k).
The ids are removed from the sum exactly, in the tile (``common.drop_ids``), rather than subtracted
afterwards: ``log(exp(lse) - sum_k exp(z_k))`` loses every digit when the ids hold almost all the
mass, which is the usual case for a peaked student. The removed logits are what the caller needs
anyway (the token's logit, the student's top-k logits), so they are written out as they are met:
no separate gather GEMM. ``ENTROPY``: also the softmax mean of the tail logits, ``E[z]`` over the
tail, which rides along the online log-sum-exp like ``terms``' one-pass mode (``H = lse - E_q[z]``).

Grid ``(cdiv(N, BLOCK_M), n_splits)`` as in ``lse``; one partial per row and split, merged in torch.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ..rows import RowSetup
from .common import (
    HEAD_HEURISTICS,
    BlockConfig,
    dot_precision,
    drop_ids,
    finish_lse,
    head_tile,
    next_id,
    online_step,
)

# The student head's heuristics of ``common.HEAD_HEURISTICS`` (these kernels have no teacher).
ROW_HEURISTICS = {name: HEAD_HEURISTICS[name] for name in ("HAS_BIAS_S", "HAS_SOFTCAP_S", "EVEN_KS")}


@triton.heuristics({**ROW_HEURISTICS, "ENTROPY": lambda args: args["mean_ptr"] is not None})
@triton.jit
def tail_lse_kernel(
    hs_ptr, ws_ptr, bs_ptr, ids_ptr, z_ids_ptr, lse_ptr, mean_ptr,
    N, K, HS, n_ids, n_splits, scale_s, cap_s, inv_temp,
    DOT_PRECISION: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, EVEN_KS: tl.constexpr,
    ENTROPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``ids_ptr``: ``(N, n_ids)`` int32, ascending per row, ``NO_ID`` for empty slots; ``z_ids_ptr``
    (same shape, fp32, pre-filled with -inf) receives the ids' logits."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    moment = tl.zeros((BLOCK_M,), tl.float32)
    cur = tl.zeros((BLOCK_M,), tl.int32)
    nxt = next_id(ids_ptr, rows, row_ok, n_ids, cur)
    for vb in range(split, tl.cdiv(K, BLOCK_N), n_splits):
        z = head_tile(hs_ptr, ws_ptr, bs_ptr, pid_m * BLOCK_M, vb * BLOCK_N, N, K, HS, scale_s, cap_s, inv_temp,
                      HAS_BIAS_S, HAS_SOFTCAP_S, EVEN_KS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        z, cur, nxt = drop_ids(z, ids_ptr, z_ids_ptr, rows, row_ok, n_ids, cur, nxt, vb * BLOCK_N, True, BLOCK_N)
        m, alpha, e = online_step(m, z)
        total = total * alpha + tl.sum(e, 1)
        if ENTROPY:
            moment = moment * alpha + tl.sum(tl.where(e == 0, 0.0, e * z), 1)
    out = split * N + rows
    tl.store(lse_ptr + out, finish_lse(m, total), mask=row_ok)
    if ENTROPY:
        tl.store(mean_ptr + out, tl.where(total == 0, 0.0, moment / total), mask=row_ok)


def row_head_arguments(hs, ws, bs, ids: torch.Tensor, setup: RowSetup, n_splits: int) -> dict[str, Any]:
    """Kernel arguments describing the single head and the per-row ids; shared with ``tail_grad``."""
    return {
        "hs_ptr": hs, "ws_ptr": ws, "bs_ptr": bs, "ids_ptr": ids,
        "N": hs.shape[0], "K": setup.vocab, "HS": hs.shape[1], "n_ids": ids.shape[1], "n_splits": n_splits,
        "scale_s": setup.spec.scale, "cap_s": setup.spec.softcap or 0.0, "inv_temp": 1.0 / setup.temperature,
        "DOT_PRECISION": dot_precision(hs.dtype),
    }


def tail_lse_arguments(hs, ws, bs, ids: torch.Tensor, setup: RowSetup, entropy: bool, n_splits: int) -> dict:
    """Keyword arguments of ``tail_lse_kernel`` (outputs allocated on ``hs``'s device)."""
    partial = torch.empty((2 if entropy else 1, n_splits, hs.shape[0]), dtype=torch.float32, device=hs.device)
    return {
        **row_head_arguments(hs, ws, bs, ids, setup, n_splits),
        "z_ids_ptr": torch.full(ids.shape, float("-inf"), dtype=torch.float32, device=hs.device),
        "lse_ptr": partial[0], "mean_ptr": partial[1] if entropy else None,
    }


def launch_tail_lse(
    hs, ws, bs, ids: torch.Tensor, setup: RowSetup, entropy: bool, config: BlockConfig, n_splits: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(tail log-sum-exp ``(N,)``, tail softmax mean ``(N,)`` or None, ids' logits ``(N, n_ids)``), fp32.

    The tail of a row with no column outside its ids has log-sum-exp -inf and mean 0.
    """
    args = tail_lse_arguments(hs, ws, bs, ids, setup, entropy, n_splits)
    grid = (triton.cdiv(hs.shape[0], config.block_m), n_splits)
    if hs.shape[0]:
        tail_lse_kernel[grid](**args, **config.constexprs(), **config.launch_options())
    part = args["lse_ptr"]
    lse = torch.logsumexp(part, 0)
    mean = None
    if entropy:  # the splits' means weighted by their share of the tail's mass
        share = torch.where(part == float("-inf"), 0.0, (part - lse).exp())
        mean = (share * args["mean_ptr"]).sum(0)
    return lse, mean, args["z_ids_ptr"]
