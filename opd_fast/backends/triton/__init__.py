"""Fused Triton kernels of the teacher-student divergence (one kernel per module).

* ``lse``   - pass 1: online log-sum-exp of both heads, split over the vocabulary.
* ``terms`` - pass 2: per-row divergence, gradient coefficient ``c`` and entropy (for the KLs
  in one sweep without pass 1).
* ``grad``  - pass 3: recompute tiles, dL/dlogits in registers, stored into a vocabulary stripe.
* ``tail_lse`` / ``tail_grad`` - the single-head losses (per-token log-probs, top-k teacher):
  log-sum-exp outside a per-row id set plus the ids' logits, and the gradient outside the ids.
* ``stripes`` - the gradient GEMMs on those stripes, in torch (cuBLAS): no atomics anywhere.
* ``cached_logits`` / ``cached`` - the cached mode: a GEMM kernel writes a token chunk's logits once per
  head as an fp16 tile-shifted cache, a memory-bound row kernel streams it into the statistics and gradient.

In the strict mode logit tiles are produced by ``tl.dot`` K-loops in on-chip memory; no logits tensor ever reaches
GPU memory, and the logit *gradient* only one ``N x V_c`` stripe at a time. ``CONFIGS`` lists
each kernel's launch configs per compute capability (what ``opd-fast kernels check`` compiles);
``pick_config`` chooses one by a shape heuristic rather than autotuning, so the first call pays
no benchmarking sweep.
"""

from __future__ import annotations

import torch

from .cached import GPU_BLOCKS, RowBlocks, cached_rows_kernel
from .cached_logits import GPU_CONFIGS as _CACHED_LOGITS_CONFIGS
from .cached_logits import cached_logits_kernel
from .common import INTERPRETER_CONFIG, BlockConfig
from .grad import grad_kernel, launch_grad
from .lse import launch_lse, lse_kernel
from .tail_grad import launch_tail_grad, tail_grad_kernel
from .tail_lse import launch_tail_lse, tail_lse_kernel
from .terms import launch_row_stats, terms_kernel

# Two fp32 logit tiles (and the gradient tile in pass 3) must stay in registers. ptxas caps
# registers for occupancy unless told otherwise and then spills, so every config lifts the cap
# (maxnreg 255) and uses 8 warps: a 64x64 fp32 tile costs 16 registers per thread. fp32 inputs
# run three TF32 MMAs per product (hi/lo operand splits live in registers), hence K slices of 16.
# Every (config, dtype, arch) compiles spill-free: `opd-fast kernels check`.
_FORWARD = {
    (80, "16-bit"): (BlockConfig(64, 64, 64, 8, 3, 255), BlockConfig(64, 128, 64, 8, 3, 255)),
    (90, "16-bit"): (BlockConfig(64, 64, 64, 8, 3, 255), BlockConfig(64, 128, 64, 8, 3, 255)),
    (80, "fp32"): (BlockConfig(64, 64, 16, 8, 3, 255),),
    (90, "fp32"): (BlockConfig(64, 64, 16, 8, 3, 255),),
}
# Pass 1 holds one fp32 logit tile at a time (the heads one after the other), so on sm_90a its wide
# config is a 128 x 128 tile: a third less L2 traffic per logit than 64 x 128. With K slices of 64
# (or on sm_80) the heaviest variant (hard labels at T != 1) spills, so K is 32 there. Two-head
# 128 x 128 tiles spill in `terms` and `grad` (244 / 1668 bytes in their heaviest variants):
# those keep 64 x 128.
_LSE = {
    **_FORWARD,
    (90, "16-bit"): (BlockConfig(64, 64, 64, 8, 3, 255), BlockConfig(128, 128, 32, 8, 3, 255)),
}
# The two-head gradient holds both logit tiles and the gradient tile. On sm_90a every 64 x 128
# config spills in one of its variants (4-52 bytes at one or two stages, K 16 or 32), so it keeps
# 64 x 64 there; the single-head gradient has one logit tile and keeps 64 x 128.
_GRAD = {
    (80, "16-bit"): (BlockConfig(64, 64, 32, 8, 2, 255), BlockConfig(64, 128, 32, 8, 1, 255)),
    (90, "16-bit"): (BlockConfig(64, 64, 64, 8, 2, 255),),
    (80, "fp32"): (BlockConfig(64, 64, 16, 8, 2, 255),),
    (90, "fp32"): (BlockConfig(64, 64, 16, 8, 1, 255),),
}
_TAIL_GRAD = {
    **_GRAD,
    (90, "16-bit"): (BlockConfig(64, 64, 64, 8, 2, 255), BlockConfig(64, 128, 32, 8, 2, 255)),
}
# The single-head forward holds one fp32 logit tile where the two-head kernels hold two, so its
# wide config (from 4096 rows) is larger: 128 x 256 on sm_90a (one wgmma m64n256 per warpgroup,
# 144 KB of shared memory, spill-free), 128 x 128 on sm_80 (128 x 256 spills there): 1.8x / 1.5x
# less L2 traffic per logit than 64 x 128. Its gradient (two live tiles: logits and gradient)
# spills at 128 rows: _TAIL_GRAD.
_ROW_FORWARD = {
    (80, "16-bit"): (BlockConfig(64, 64, 64, 8, 3, 255), BlockConfig(128, 128, 32, 8, 3, 255)),
    (90, "16-bit"): (BlockConfig(64, 64, 64, 8, 3, 255), BlockConfig(128, 256, 64, 8, 3, 255)),
    (80, "fp32"): (BlockConfig(64, 64, 16, 8, 3, 255), BlockConfig(128, 128, 16, 8, 3, 255)),
    (90, "fp32"): (BlockConfig(64, 64, 16, 8, 3, 255), BlockConfig(128, 128, 16, 8, 3, 255)),
}
# The cached mode's row kernel streams rows from memory: one config for every arch and dtype.
_CACHED_ROWS = {(arch, dtype): (GPU_BLOCKS,) for arch in (80, 90) for dtype in ("16-bit", "fp32")}
# The cached mode's logit-cache GEMM runs for 16-bit inputs only (fp32 ones keep torch's fp32 logits).
_CACHED_LOGITS = {(arch, "16-bit"): (config,) for arch, config in _CACHED_LOGITS_CONFIGS.items()}
CONFIGS: dict[str, dict[tuple[int, str], tuple[BlockConfig | RowBlocks, ...]]] = {
    "lse": _LSE, "terms": _FORWARD, "grad": _GRAD, "tail_lse": _ROW_FORWARD, "tail_grad": _TAIL_GRAD,
    "cached_rows": _CACHED_ROWS, "cached_logits": _CACHED_LOGITS,
}
KERNELS = {
    "lse": lse_kernel, "terms": terms_kernel, "grad": grad_kernel, "tail_lse": tail_lse_kernel,
    "tail_grad": tail_grad_kernel, "cached_rows": cached_rows_kernel, "cached_logits": cached_logits_kernel,
}
# Kernels without a GEMM (no tensor-core instructions expected in their SASS).
NO_MMA = frozenset({"cached_rows"})


def configs_for(kernel: str, arch: int, dtype: torch.dtype) -> tuple[BlockConfig | RowBlocks, ...]:
    """The launch configs of ``kernel`` for compute capability ``arch`` (80+) and input ``dtype`` (none: the
    kernel does not run for that dtype)."""
    return CONFIGS[kernel].get((90 if arch >= 90 else 80, "fp32" if dtype == torch.float32 else "16-bit"), ())


def pick_config(kernel: str, arch: int | None, dtype: torch.dtype, n_rows: int) -> BlockConfig:
    """The launch config of ``kernel`` (``arch`` None: the interpreter).

    Heuristic instead of autotuning (no benchmarking sweep on the first call): the first config
    (the compile-checked default) for small batches, where the vocabulary split fills the GPU;
    the second (a wider vocabulary tile: a third less L2 traffic per logit) from 4096 rows on.
    """
    if arch is None:
        return INTERPRETER_CONFIG
    choices = configs_for(kernel, arch, dtype)
    return choices[-1] if n_rows >= 4096 else choices[0]


__all__ = [
    "CONFIGS", "KERNELS", "NO_MMA", "BlockConfig", "RowBlocks", "configs_for", "launch_grad", "launch_lse",
    "launch_row_stats",
    "launch_tail_grad", "launch_tail_lse", "pick_config",
]
