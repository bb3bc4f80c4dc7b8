"""The cached mode's logit cache: one head's logits of a token chunk as fp16 values shifted by their tile's max.

``cached_logits_kernel`` is a single-head GEMM (one program per ``BLOCK_M x BLOCK_N`` output tile,
ordered in groups of ``GROUP_M`` row blocks so a weight block is reused from L2) computing the raw
logits ``r = scale (h W^T + b)`` with an fp32 accumulator. It is not persistent: a loop over tiles per SM
keeps more state live and spills where this kernel does not (104 bytes at 128 x 128 x 64 on sm_90a,
``opd-fast kernels check``). Its epilogue stores, per (row, vocabulary tile of ``BLOCK_N`` columns):

* ``v = fp16(r - m)`` with ``m`` the tile's row max (fp32): values in ``[-65504, 0]``;
* ``m`` itself and ``s = sum exp(f(m + v) - f(m))`` with ``f(x) = softcap(x) / T`` the final logit
  (monotone, so ``f(m)`` is the tile's final max): the row kernel merges these ``V / BLOCK_N``
  statistics into the row's log-sum-exp instead of streaming its logits a third time. The sum is
  taken over the *stored* values, so the LSE and the later passes see the same logits.

Precision. fp16 rounds ``v`` to a relative error of at most ``2^-11``. An entry ``|v|`` below its
tile's max has probability ``q = q_m e^v`` (``q_m <= 1``, the max's), so its probability moves by
at most ``q_m |v| e^v 2^-11 <= q_m 2^-11 / e ~ 1.8e-4 q_m``: the entries that carry the mass are
the near-exact ones, and the row's LSE moves by at most ``2^-11 E_q[|v|]``. A 16-bit *raw* logit
instead errs in proportion to its own magnitude (bf16: up to 0.06 at 30, moving that entry's
probability by ~6 %), which is why the cache shifts before it rounds. Finite values below the
fp16 range clamp to -65504 (their exponential is 0 either way, a softcap saturates there); -inf
logits (a -inf bias) stay -inf, masked columns past the compared vocabulary are not stored.

Memory per logit: 2 bytes per head; the row kernel writes the student's 16-bit gradient over the
student's cache (same size, read just before), so a chunk costs 4 bytes per logit, not the 10 of
fp32 logits plus a separate gradient. fp32 inputs keep the torch GEMM's fp32 logits (exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...core.call import HeadSpec
from ..chunked import Head
from .common import INTERPRET, BlockConfig, dot_precision, even_k, raw_head_tile, tanh

# The smallest fp16 magnitude-limited value: finite shifts below it clamp here (exp underflows long before).
_FP16_LOWEST = tl.constexpr(-65504.0)
# Row blocks of output tiles walked together, so their shared weight blocks are read from L2 once.
GROUP_M = 8


def cache_dtype(dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for inputs of ``dtype``: fp16 shifted values for 16-bit inputs, fp32 logits else."""
    return torch.float16 if dtype in (torch.float16, torch.bfloat16) else torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class ShiftedLogits:
    """One head's logits of a token chunk in the cache format (``cached_logits_kernel``'s outputs).

    ``values`` ``(n, K)`` fp16 ``r - m`` per tile; ``stats`` ``(2, n, tiles)`` fp32: each tile's row max
    ``m`` of the raw logits, and the sum-exp of its final logits relative to the final max.
    """

    values: torch.Tensor
    stats: torch.Tensor
    tile_n: int


@triton.heuristics({
    "HAS_BIAS": lambda args: args["b_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["cap"] > 0,
    "EVEN_K": even_k("H"),
})
@triton.jit
def cached_logits_kernel(
    h_ptr, w_ptr, b_ptr, v_ptr, stats_ptr, N, K, H, stride_v, n_tiles, scale, cap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WIDEN: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``v_ptr`` ``(N, K)`` fp16 (row stride ``stride_v``), ``stats_ptr`` ``(2, N, n_tiles)`` fp32 (see the module).

    ``WIDEN`` (the interpreter only, whose bf16 ``tl.dot`` is broken) upcasts the operands to fp32 first: products
    of 16-bit numbers are exact in fp32, so the interpreter checks everything but the MMA instruction itself.
    """
    row_blocks = tl.cdiv(N, BLOCK_M)
    per_group = GROUP * n_tiles
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    tile = tl.program_id(0)
    first = tile // per_group * GROUP
    rows_here = tl.minimum(row_blocks - first, GROUP)
    row0 = (first + tile % per_group % rows_here) * BLOCK_M
    col_tile = tile % per_group // rows_here
    col0 = col_tile * BLOCK_N
    rows = row0 + r
    row_ok = rows < N
    acc, col_ok = raw_head_tile(h_ptr, w_ptr, b_ptr, row0, col0, N, K, H, scale, HAS_BIAS, EVEN_K, DOT_PRECISION,
                                WIDEN, BLOCK_M, BLOCK_N, BLOCK_K)
    raw = tl.where(col_ok[None, :], acc, float("-inf"))
    m = tl.max(raw, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # an all -inf tile: shift 0, its values stay -inf
    shifted = tl.where(raw == float("-inf"), raw, tl.maximum(raw - m[:, None], _FP16_LOWEST))
    v = shifted.to(tl.float16)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(v_ptr + tl.cast(rows, tl.int64)[:, None] * stride_v + (col0 + c)[None, :], v, mask=ok)
    z = m[:, None] + v.to(tl.float32)  # the stored logit: the statistics describe what the row kernel reads
    z_max = m
    if HAS_SOFTCAP:
        z = cap * tanh(z / cap)
        z_max = cap * tanh(z_max / cap)
    e = tl.where(col_ok[None, :], tl.exp((z - z_max[:, None]) * inv_temp), 0.0)
    at = stats_ptr + tl.cast(rows, tl.int64) * n_tiles + col_tile
    tl.store(at, m, mask=row_ok)
    tl.store(at + tl.cast(N, tl.int64) * n_tiles, tl.sum(e, 1), mask=row_ok)


# Single-head tiles, one fp32 accumulator live: 128 x 128 (what `opd-fast kernels check` compiles spill-free;
# rejected for spills: 128 x 256 x 64 s3 on sm_90a 316 B, 128 x 128 x 32 s3 on sm_80 48 B).
GPU_CONFIGS = {
    80: BlockConfig(128, 128, 32, 8, 2, 255),
    90: BlockConfig(128, 128, 64, 8, 3, 255),
}
# Tiles the interpreter accepts, 32 columns: several vocabulary tiles at the tests' tiny vocabularies.
INTERPRETER_TILES = BlockConfig(16, 32, 16, num_warps=1, num_stages=1)


def pick_tiles(device: torch.device) -> BlockConfig:
    """The launch config for ``device`` (the interpreter's when it runs CPU tensors)."""
    if INTERPRET or device.type != "cuda":
        return INTERPRETER_TILES
    major, _ = torch.cuda.get_device_capability(device)
    return GPU_CONFIGS[90 if major >= 9 else 80]


def cached_logits_arguments(h: torch.Tensor, head: Head, spec: HeadSpec, temperature: float, vocab: int,
                            values: torch.Tensor, stats: torch.Tensor) -> dict:
    """Keyword arguments of ``cached_logits_kernel`` writing the cache of ``h``'s rows into ``values`` / ``stats``."""
    return {
        "h_ptr": h, "w_ptr": head.weight, "b_ptr": head.bias, "v_ptr": values, "stats_ptr": stats,
        "N": h.shape[0], "K": vocab, "H": h.shape[1], "stride_v": values.stride(0), "n_tiles": stats.shape[-1],
        "scale": head.scale, "cap": spec.softcap or 0.0, "inv_temp": 1.0 / temperature,
        "DOT_PRECISION": "ieee" if INTERPRET else dot_precision(h.dtype), "WIDEN": INTERPRET, "GROUP": GROUP_M,
    }


def shifted_logits(h: torch.Tensor, head: Head, spec: HeadSpec, temperature: float, vocab: int,
                   buffer: torch.Tensor) -> ShiftedLogits:
    """The cache of one head's logits of the chunk ``h``, its values in the front of the flat fp16 ``buffer``."""
    n = h.shape[0]
    config = pick_tiles(h.device)
    tiles = triton.cdiv(vocab, config.block_n)
    values = buffer[: n * vocab].view(n, vocab)
    stats = torch.empty(2, n, tiles, dtype=torch.float32, device=h.device)
    if n:
        args = cached_logits_arguments(h.contiguous(), head, spec, temperature, vocab, values, stats)
        grid = (triton.cdiv(n, config.block_m) * tiles,)
        cached_logits_kernel[grid](**args, **config.constexprs(), **config.launch_options())
    return ShiftedLogits(values, stats, config.block_n)
