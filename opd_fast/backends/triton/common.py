"""Device helpers shared by the three kernels, block configs, and the compile-only path.

The kernels differ only in what they do with a pair of logit tiles, so producing a tile
(``head_tile``), the online log-sum-exp update and the per-element divergence math
(``tile_terms``, the register twin of ``backends.tile_math.tile_terms``) live here once.

Every kernel takes its optional features as ``tl.constexpr`` flags filled in by
``triton.heuristics`` from the launch arguments (``HAS_BIAS_*``, ``HAS_SOFTCAP_*``,
``EVEN_K*``), so a bias-free, softcap-free head compiles to code without those branches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Divergence codes of the DIVERGENCE constexpr (jsd with beta 0 / 1 is remapped on the host).
FORWARD_KL, REVERSE_KL, JSD, TVD = 0, 1, 2, 3
_CODES = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD, "tvd": TVD}


@dataclass(frozen=True)
class BlockConfig:
    """One launch configuration: tile sizes and the warps / pipeline stages running it."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None

    def launch_options(self) -> dict[str, int]:
        """Keyword options of a launch / ``triton.compile`` (warps, pipeline depth, register cap)."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        return opts if self.maxnreg is None else {**opts, "maxnreg": self.maxnreg}

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}

    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"


# The smallest tiles tl.dot accepts: the interpreter runs every program in numpy, so tests stay fast.
INTERPRETER_CONFIG = BlockConfig(16, 32, 16, num_warps=1, num_stages=1)


def divergence_code(divergence: str, beta: float) -> int:
    """Kernel code of a divergence; jsd at beta 0 / 1 *is* forward / reverse KL (exact endpoints)."""
    if divergence == "jsd" and beta == 0.0:
        return FORWARD_KL
    if divergence == "jsd" and beta == 1.0:
        return REVERSE_KL
    return _CODES[divergence]


def jsd_logs(beta: float) -> tuple[float, float]:
    """(log beta, log(1 - beta)) for the mixture's log-density; unused (0) outside 0 < beta < 1."""
    return (math.log(beta), math.log1p(-beta)) if 0.0 < beta < 1.0 else (0.0, 0.0)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use three TF32 MMAs (near-fp32 accuracy on tensor cores); 16-bit ones are exact."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def even_k(hidden: str) -> Callable[[dict[str, Any]], bool]:
    """Heuristic: the K-loop over ``hidden`` needs no bounds mask."""
    return lambda args: args[hidden] % args["BLOCK_K"] == 0


HEAD_HEURISTICS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "HAS_BIAS_S": lambda args: args["bs_ptr"] is not None,
    "HAS_BIAS_T": lambda args: args["bt_ptr"] is not None,
    "HAS_SOFTCAP_S": lambda args: args["cap_s"] > 0,
    "HAS_SOFTCAP_T": lambda args: args["cap_t"] > 0,
    "EVEN_KS": even_k("HS"),
    "EVEN_KT": even_k("HT"),
}


# Flag of the gradient kernels: gradient filtering (which gradients are wanted is the torch GEMMs' business).
GRAD_HEURISTICS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "HAS_FILTER": lambda args: args["filter_eps"] > 0,
}


def head_arguments(hs, ws, bs, ht, wt, bt, opts, n_splits: int) -> dict[str, Any]:
    """Kernel arguments describing both heads; shared by every kernel's launcher."""
    return {
        "hs_ptr": hs, "ws_ptr": ws, "bs_ptr": bs, "ht_ptr": ht, "wt_ptr": wt, "bt_ptr": bt,
        "N": hs.shape[0], "K": opts.vocab_size, "HS": hs.shape[1], "HT": ht.shape[1], "n_splits": n_splits,
        "scale_s": opts.student.scale, "scale_t": opts.teacher.scale,
        "cap_s": opts.student.softcap or 0.0, "cap_t": opts.teacher.softcap or 0.0,
        "inv_temp": 1.0 / opts.temperature,
        "DOT_PRECISION": dot_precision(hs.dtype), "DOT_PRECISION_T": dot_precision(ht.dtype),
    }


@triton.jit
def tanh(x):
    """tanh from one exp of a non-positive argument (portable, never overflows, exact +-1 at +-inf)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def raw_head_tile(
    h_ptr, w_ptr, b_ptr, row0, col0, n_rows, n_cols, hidden, scale,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Raw fp32 logits ``scale (h W^T + b)`` of the tile at rows ``row0:``, columns ``col0:``, and which
    columns are in the compared vocabulary (``< n_cols``); the caller masks the others.

    The block's base addresses are formed in int64 (``V x H`` may exceed 2^31 elements); the
    per-element offsets inside a block stay int32. ``WIDEN`` upcasts 16-bit operands to fp32 before the
    dot (the interpreter's bf16 ``tl.dot`` is broken; products of 16-bit numbers are exact in fp32).
    """
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    row_ok = row0 + r < n_rows
    col_ok = col0 + c < n_cols
    h_ptr += tl.cast(row0, tl.int64) * hidden
    w_ptr += tl.cast(col0, tl.int64) * hidden
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            h = tl.load(h_ptr + r[:, None] * hidden + ks[None, :], mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptr + c[:, None] * hidden + ks[None, :], mask=col_ok[:, None], other=0.0)
        else:
            k_ok = ks < hidden
            h = tl.load(h_ptr + r[:, None] * hidden + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + c[:, None] * hidden + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if WIDEN:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + col0 + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * scale, col_ok


@triton.jit
def head_tile(
    h_ptr, w_ptr, b_ptr, row0, col0, n_rows, n_cols, hidden, scale, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Final fp32 logits ``softcap(scale (h W^T + b)) / T`` of the tile at rows ``row0:``, columns ``col0:``.

    Columns at or beyond ``n_cols`` (the compared vocabulary) come back as -inf: zero mass.
    """
    acc, col_ok = raw_head_tile(h_ptr, w_ptr, b_ptr, row0, col0, n_rows, n_cols, hidden, scale, HAS_BIAS, EVEN_K,
                                DOT_PRECISION, False, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    acc = acc * inv_temp
    return tl.where(col_ok[None, :], acc, float("-inf"))


@triton.jit
def online_step(m, z):
    """New running row max, the rescale factor of older sums, and ``exp(z - max)`` of a tile.

    Rows that are all -inf so far keep max -inf and use 0 as the shift, so no inf - inf appears.
    """
    m_new = tl.maximum(m, tl.max(z, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp(m - m_safe), tl.exp(z - m_safe[:, None])


@triton.jit
def online_lse(m, s, z):
    """Fold a tile of logits into a running (max, sum of exp) per row."""
    m_new, alpha, e = online_step(m, z)
    return m_new, s * alpha + tl.sum(e, 1)


@triton.jit
def finish_lse(m, s):
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(s)


@triton.jit
def tile_terms(z_s, z_t, lse_s, lse_t, beta, log_beta, log_1m_beta, DIVERGENCE: tl.constexpr):
    """Element-wise divergence value, gradient numerator ``a``, ``q`` and ``q log q`` of a tile.

    The gradient wrt the student logits is ``a - q c`` with ``c`` the row sum of ``a`` (see
    ``backends/tile_math.py``); products with a zero probability are 0, so -inf logits are legal.
    Only an exact zero is guarded (``== 0``, not ``> 0``): a NaN probability, from a non-finite input,
    must reach the value and the gradient.
    """
    log_q = z_s - lse_s[:, None]
    log_p = z_t - lse_t[:, None]
    q = tl.exp(log_q)
    p = tl.exp(log_p)
    q_log_q = tl.where(q == 0, 0.0, q * log_q)
    if DIVERGENCE == 0:  # forward KL
        value = tl.where(p == 0, 0.0, p * (log_p - log_q))
        a = -p
    elif DIVERGENCE == 1:  # reverse KL
        a = tl.where(q == 0, 0.0, q * (log_q - log_p))
        value = a
    elif DIVERGENCE == 2:  # generalized JSD, 0 < beta < 1
        x = log_p + log_beta
        y = log_q + log_1m_beta
        mx = tl.maximum(x, y)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        log_m = mx_safe + tl.log(tl.exp(x - mx_safe) + tl.exp(y - mx_safe))
        kl_q = tl.where(q == 0, 0.0, q * (log_q - log_m))
        value = beta * tl.where(p == 0, 0.0, p * (log_p - log_m)) + (1.0 - beta) * kl_q
        a = (1.0 - beta) * kl_q
    else:  # total variation
        diff = q - p
        value = 0.5 * tl.abs(diff)
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, tl.where(diff == diff, 0.0, diff)))  # NaN stays
        a = 0.5 * q * sign
    return value, a, q, q_log_q


# Hard labels: ``labels_ptr`` (int64 compacted rows, -1 = no label) switches the cross-entropy on;
# ``HARD_LSE`` marks T != 1, where the CE needs the log-sum-exp of ``T z`` (at T = 1 it is the
# student's own). Without labels both are False and the kernels compile to their label-free code.
LABEL_HEURISTICS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "HAS_LABELS": lambda args: args["labels_ptr"] is not None,
    "HARD_LSE": lambda args: args["labels_ptr"] is not None and args["temperature"] != 1.0,
}


@triton.jit
def label_hit(labels_ptr, rows, row_ok, col0, BLOCK_N: tl.constexpr):
    """``(BLOCK_M, BLOCK_N)`` mask of each row's label column in the tile at columns ``col0:``.

    The labels are reloaded per tile (a few bytes, L1-resident) rather than kept live in
    registers across the tile loop, where the gradient pass has none to spare.
    """
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    return tl.arange(0, BLOCK_N)[None, :] == (labels - col0)[:, None]


@triton.jit
def label_logit(z, labels_ptr, rows, row_ok, col0, BLOCK_N: tl.constexpr):
    """Each row's logit at its label if the label's column is in this tile, else 0."""
    return tl.sum(tl.where(label_hit(labels_ptr, rows, row_ok, col0, BLOCK_N), z, 0.0), 1)


@triton.jit
def scaled_lse_step(s, m_prev, m, z, temperature):
    """Fold a tile into the running ``sum exp(T (z - m))`` of the log-sum-exp of ``T z`` (T > 0).

    ``max(T z) = T max(z)``, so the student's own running max (``m_prev`` before this tile,
    ``m`` after) is the shift: no second max reduction and no second running max per row.
    The log-sum-exp is ``finish_lse(T m, s)``.
    """
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return s * tl.exp((m_prev - m_safe) * temperature) + tl.sum(tl.exp((z - m_safe[:, None]) * temperature), 1)


def label_arguments(labels: torch.Tensor | None, opts, partial: torch.Tensor | None) -> dict[str, Any]:
    """Kernel arguments of the hard-label outputs: per-split label logits and (T != 1) LSEs of ``T z``.

    ``partial``: a ``(2, n_splits, N)`` fp32 output buffer (None without labels). Without labels
    every argument is None (a constexpr), so the kernel's parameter list is the label-free one.
    """
    hard_lse = labels is not None and opts.temperature != 1.0
    return {
        "labels_ptr": labels, "label_logit_ptr": None if labels is None else partial[0],
        "lse_y_ptr": partial[1] if hard_lse else None, "temperature": None if labels is None else opts.temperature,
    }


def merge_labels(args: dict[str, Any], student_lse: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(cross_entropy, lse(T z)) per row from a kernel's label partials; (None, None) without labels.

    ``z[label]`` lies in one split's tile (the others add 0); at T = 1 ``lse(T z)`` is the student's.
    """
    labels = args["labels_ptr"]
    if labels is None:
        return None, None
    lse_y = student_lse if args["lse_y_ptr"] is None else torch.logsumexp(args["lse_y_ptr"], 0)
    y_label = args["label_logit_ptr"].sum(0) * args["temperature"]
    return torch.where(labels >= 0, lse_y - y_label, 0.0), lse_y


def _signature_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int64: "i64"}
        return "*" + names[value.dtype]
    if isinstance(value, bool):
        return "i1"
    return "i32" if isinstance(value, int) else "fp32"


def compile_for_target(kernel: triton.runtime.Heuristics, args: dict[str, Any], config: BlockConfig, arch: int):
    """Compile ``kernel`` for ``sm_<arch>`` (``sm_90a`` for 90) without a GPU; returns the CompiledKernel.

    ``args`` are the launcher's keyword arguments (tensors may live on the meta device); the
    heuristics are applied exactly as a launch would, pointers and hidden sizes get the 16-byte
    divisibility a real launch of contiguous model tensors sees.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    full = {**args, **config.constexprs()}
    for name, rule in kernel.values.items():
        full[name] = rule(full)
    constexpr_names = {name for name in fn.arg_names if fn.params[fn.arg_names.index(name)].is_constexpr}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = full[name]
        if name in constexpr_names or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        signature[name] = _signature_type(value)
        if isinstance(value, torch.Tensor) or name in ("HS", "HT", "H"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=config.launch_options())


# ---- single-head rows with a per-row id set (``tail_lse``, ``tail_grad``) ----------------------

# Id of an empty top-k slot / a cursor past the end of a row's ids: above every column, never matched.
NO_ID = tl.constexpr(2**31 - 1)


@triton.jit
def next_id(ids_ptr, rows, row_ok, n_ids, cur):
    """Each row's id at its cursor into its ascending id list; ``NO_ID`` past the end and on padded rows."""
    return tl.load(ids_ptr + tl.cast(rows, tl.int64) * n_ids + cur, mask=row_ok & (cur < n_ids), other=NO_ID)


@triton.jit
def drop_ids(
    z, ids_ptr, z_ids_ptr, rows, row_ok, n_ids, cur, nxt, col0, GATHER: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Remove each row's ids from the logit tile at columns ``col0:``: their logits become -inf.

    Ids are ascending per row (``NO_ID`` padded) and a program walks its vocabulary tiles in
    ascending order, so a cursor per row (``cur``, with ``nxt`` the id under it) finds the ids
    of a tile in one step per id. Ids below the tile belong to another split's tiles and are
    skipped. ``GATHER``: write the removed logits to ``z_ids_ptr`` at the id's slot (each id
    lies in exactly one tile, so every slot is written once). The loop runs while any row of
    the block still has an id before the tile's end: usually zero or one step per tile.
    """
    cols = col0 + tl.arange(0, BLOCK_N)
    end = col0 + BLOCK_N
    while tl.max((nxt < end).to(tl.int32), 0) > 0:
        here = nxt[:, None] == cols[None, :]
        if GATHER:
            slot = z_ids_ptr + tl.cast(rows, tl.int64) * n_ids + cur
            tl.store(slot, tl.sum(tl.where(here, z, 0.0), 1), mask=(nxt >= col0) & (nxt < end))
        z = tl.where(here, float("-inf"), z)
        cur += (nxt < end).to(tl.int32)
        nxt = next_id(ids_ptr, rows, row_ok, n_ids, cur)
    return z, cur, nxt


@triton.jit
def store_grad_tile(
    g, z, live, g_ptr, g_stride, row0, col0, stripe0, n_rows, stripe_end, cap, inv_temp, scale, filter_eps,
    HAS_SOFTCAP: tl.constexpr, HAS_FILTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Finish a ``dL/dz`` tile (already divided by T) and store it into its vocabulary stripe's buffer.

    Chains the softcap (``1 - tanh^2``, recovered from the final logits ``z``) and the head's
    scale, gives zero gradient where ``live`` is False (padded rows / columns, zero mass), and with
    ``HAS_FILTER`` stores zeros for a tile whose largest ``|g|`` is below ``filter_eps`` (the same
    values as skipping it). The buffer (``stripes.py``) holds columns ``stripe0:stripe_end`` of all
    rows in the head's dtype, row stride ``g_stride``; the grad GEMMs then run on it in torch.
    """
    if HAS_SOFTCAP:
        t = z * (1.0 / (cap * inv_temp))  # inf where z is -inf: the select below zeroes those
        g = g * (1.0 - t * t)
    g = tl.where(live, g * scale, 0.0)
    if HAS_FILTER:
        g = tl.where(tl.max(tl.max(tl.abs(g), 1), 0) >= filter_eps, g, 0.0)
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    ok = (row0 + r < n_rows)[:, None] & (col0 + c < stripe_end)[None, :]
    base = g_ptr + tl.cast(row0, tl.int64) * g_stride + (col0 - stripe0)
    tl.store(base + r[:, None] * g_stride + c[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)
