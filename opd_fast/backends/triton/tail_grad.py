"""Single-head gradient over the columns outside a per-row id set (log-probs, top-k teacher loss).

Both single-head losses have, outside the row's ids, a gradient of one shape in the final logits:

    g_v = exp(z_v - lse_ref) * (coef + slope * (z_v - lse_ref))        (v not an id of the row)

* top-k, ``tail="bucket"``: ``lse_ref`` the tail's log-sum-exp, ``coef`` the tail category's
  gradient, no slope (``exp(z_v - lse_tail)`` is the chain rule of the tail's log-sum-exp);
* log-probs: ``lse_ref`` the row's log-sum-exp, ``coef = -(u_lp + u_ent H)``, ``slope = -u_ent``
  (from ``d log q(y)/dz = onehot(y) - q`` and ``dH/dz = -q (log q + H)``).

The ids' own columns are left out (``common.drop_ids``) and handled exactly by the caller as a
k-sparse correction in torch: adding a dense term there and cancelling it afterwards would lose
precision (``exp(z_id - lse_tail)`` can be huge). Per tile: recompute the logits, form ``g`` in
registers, chain temperature / softcap / scale and store it into the vocabulary stripe's buffer
(``common.store_grad_tile``); the grad GEMMs run in torch (``stripes.py``; the design of ``grad``,
with its gradient filter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.engine import Student, StudentGrads, Want
from ..rows import RowSetup
from .common import GRAD_HEURISTICS, BlockConfig, drop_ids, head_tile, next_id, store_grad_tile
from .stripes import SparseColumns, StripePlan, stripe_gradients
from .tail_lse import ROW_HEURISTICS, row_head_arguments


@triton.heuristics({
    **ROW_HEURISTICS,
    "HAS_SLOPE": lambda args: args["slope_ptr"] is not None,
    **GRAD_HEURISTICS,
})
@triton.jit
def tail_grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, ids_ptr, lse_ptr, coef_ptr, slope_ptr, g_ptr, g_stride, stripe0, stripe_end,
    N, K, HS, n_ids, n_splits, scale_s, cap_s, inv_temp, filter_eps,
    DOT_PRECISION: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_SOFTCAP_S: tl.constexpr, EVEN_KS: tl.constexpr,
    HAS_SLOPE: tl.constexpr, HAS_FILTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``lse_ptr`` must be finite (the caller puts 0 where a row's tail is empty); ``g_ptr``: the stripe's
    ``(N, g_stride)`` buffer for columns ``stripe0:stripe_end`` (``stripe0`` a multiple of BLOCK_N)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    if HAS_SLOPE:
        slope = tl.load(slope_ptr + rows, mask=row_ok, other=0.0)
    cur = tl.zeros((BLOCK_M,), tl.int32)
    nxt = next_id(ids_ptr, rows, row_ok, n_ids, cur)
    for vb in range(stripe0 // BLOCK_N + split, tl.cdiv(stripe_end, BLOCK_N), n_splits):
        z = head_tile(hs_ptr, ws_ptr, bs_ptr, pid_m * BLOCK_M, vb * BLOCK_N, N, K, HS, scale_s, cap_s, inv_temp,
                      HAS_BIAS_S, HAS_SOFTCAP_S, EVEN_KS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        z, cur, nxt = drop_ids(z, ids_ptr, ids_ptr, rows, row_ok, n_ids, cur, nxt, vb * BLOCK_N, False, BLOCK_N)
        live = row_ok[:, None] & (z != float("-inf"))  # zero mass (ids, padded columns / rows) gets zero gradient
        d = tl.where(live, z - lse[:, None], 0.0)
        factor = coef[:, None]
        if HAS_SLOPE:
            factor = factor + slope[:, None] * d
        g = tl.exp(d) * factor * inv_temp
        store_grad_tile(g, z, live, g_ptr, g_stride, pid_m * BLOCK_M, vb * BLOCK_N, stripe0, N, stripe_end,
                        cap_s, inv_temp, scale_s, filter_eps, HAS_SOFTCAP_S, HAS_FILTER, BLOCK_M, BLOCK_N)


def tail_grad_arguments(
    hs, ws, bs, ids: torch.Tensor, lse, coef, slope, setup: RowSetup, buffer: torch.Tensor, n_splits: int,
) -> dict:
    """Keyword arguments of ``tail_grad_kernel`` writing into ``buffer`` (``(N, V_c)``, the head's dtype).

    The stripe bounds start at the first stripe; ``launch_tail_grad`` moves them.
    """
    return {
        **row_head_arguments(hs, ws, bs, ids, setup, n_splits),
        "lse_ptr": lse, "coef_ptr": coef, "slope_ptr": slope,
        "g_ptr": buffer, "g_stride": buffer.shape[1], "stripe0": 0, "stripe_end": min(buffer.shape[1], setup.vocab),
        "filter_eps": setup.tuning.grad_filter_eps or 0.0,
    }


def launch_tail_grad(
    student: Student, ids: torch.Tensor, lse, coef, slope, setup: RowSetup, want: Want, config: BlockConfig,
    plan: StripePlan, sparse: SparseColumns | None = None,
) -> StudentGrads:
    """Gradients of the dense part plus the ids' exact columns ``sparse`` (``stripes.stripe_gradients``' dtypes;
    ``slope`` may be None)."""
    hs = student.hidden

    def kernel(buffer: torch.Tensor, start: int, stop: int) -> None:
        args = tail_grad_arguments(*student, ids, lse, coef, slope, setup, buffer, plan.splits)
        args.update(stripe0=start, stripe_end=stop)
        tail_grad_kernel[(triton.cdiv(hs.shape[0], config.block_m), plan.splits)](
            **args, **config.constexprs(), **config.launch_options())

    return stripe_gradients(student, setup.vocab, want, plan.width, kernel, sparse)
