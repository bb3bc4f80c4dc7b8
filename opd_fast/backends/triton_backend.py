"""The Triton backend: availability, launch planning and the autograd glue of the three passes.

``run`` has the registry's uniform signature (compacted 2-D rows, per-row coefficients; see
``opd_fast/backends/__init__.py``). Passes (``backends/triton/``): 1 log-sum-exps, 2 per-row
divergence / coefficient / entropy (one sweep does both for the KLs), 3 student gradients. For
scalar reductions (mean, sum) pass 3 runs inside the forward with the row coefficients, and
backward only scales the stored gradients; with ``reduction="none"`` the forward keeps
per-row statistics and backward runs pass 3 with ``incoming gradient x row coefficient``.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (tests only); normal dispatch
never offers Triton for CPU tensors (the registry refuses non-CUDA devices before asking here),
so the tests route ``backend="triton"`` to ``run`` explicitly
(``tests/backends/test_triton.py``, fixture ``triton_loss``).
"""

from __future__ import annotations

import contextlib

import torch

from ..validation import LossOptions
from .chunked import Tuning
from .triton import launch_grad, launch_row_stats, pick_config
from .triton.common import INTERPRET

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Programs per SM the vocabulary split aims for: enough resident tiles to hide memory latency.
_PROGRAMS_PER_SM = 2
# The interpreter has no SMs; 3 programs per row block still exercises the split merge.
_INTERPRETER_PROGRAMS = 3


def availability() -> tuple[bool, str]:
    """(usable, reason): a CUDA device of compute capability 8.0+ (tl.dot on bf16 / fp16 / tf32)."""
    if INTERPRET:
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"the Triton kernels need compute capability 8.0+ (Ampere), this GPU is {major}.{minor}"
    return True, ""


def _arch(device: torch.device) -> int | None:
    if INTERPRET or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _tile_dtype(hs: torch.Tensor, ht: torch.Tensor) -> torch.dtype:
    """The dtype that sizes the tiles: fp32 (tf32x3 products, K slices of 16) if either head is fp32."""
    return torch.float32 if torch.float32 in (hs.dtype, ht.dtype) else hs.dtype


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU (Triton launches on the current device), no-op elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _splits(device: torch.device, n_rows: int, vocab: int, block_m: int, block_n: int) -> int:
    """Vocabulary splits so that (row blocks x splits) covers the GPU; 1 when rows alone do."""
    if _arch(device) is None:
        target = _INTERPRETER_PROGRAMS
    else:
        target = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = max(1, -(-n_rows // block_m))
    return max(1, min(-(-target // row_blocks), -(-vocab // block_n)))


def _student_grads(hs, ws, bs, ht, wt, bt, lse_s, lse_t, coef, row_scale, opts, want, tuning: Tuning):
    n, k = hs.shape[0], opts.vocab_size
    config = pick_config("grad", _arch(hs.device), _tile_dtype(hs, ht), n)
    splits = _splits(hs.device, n, k, config.block_m, config.block_n)
    return launch_grad(hs, ws, bs, ht, wt, bt, lse_s, lse_t, coef, row_scale, opts, want, config, splits,
                       tuning.grad_filter_eps)


class TritonDivergence(torch.autograd.Function):
    """Autograd glue: inputs are compacted 2-D rows; returns (values, *per-row stats)."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, row_weights, opts: LossOptions, tuning: Tuning, scalar: bool):
        want = (hs.requires_grad, ws.requires_grad, bs is not None and bs.requires_grad)
        n, k = hs.shape[0], opts.vocab_size
        config = pick_config("lse", _arch(hs.device), _tile_dtype(hs, ht), n)
        splits = _splits(hs.device, n, k, config.block_m, config.block_n)
        row_weights = row_weights.float()
        with torch.no_grad(), _on(hs.device):
            lse_s, lse_t, div, coef, entropy = launch_row_stats(hs, ws, bs, ht, wt, bt, opts, config, splits)
            if scalar:
                value = (div * row_weights).sum()
                grads = (None, None, None)
                if any(want):
                    grads = _student_grads(hs, ws, bs, ht, wt, bt, lse_s, lse_t, coef, row_weights, opts, want, tuning)
                ctx.save_for_backward(*grads)
            else:
                value = div * row_weights
                ctx.save_for_backward(hs, ws, bs, ht, wt, bt, row_weights, lse_s, lse_t, coef)
        ctx.meta = (opts, tuning, scalar, want)
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        stats = (div, lse_s, lse_t, entropy)
        ctx.mark_non_differentiable(*stats)
        return (value, *stats)

    @staticmethod
    def backward(ctx, grad_value, *_):
        opts, tuning, scalar, want = ctx.meta
        if scalar:
            grads = [None if g is None else g * grad_value for g in ctx.saved_tensors]
        else:
            hs, ws, bs, ht, wt, bt, row_weights, lse_s, lse_t, coef = ctx.saved_tensors
            row_scale = (grad_value.float() * row_weights).contiguous()
            with torch.no_grad(), _on(hs.device):
                grads = _student_grads(hs, ws, bs, ht, wt, bt, lse_s, lse_t, coef, row_scale, opts, want, tuning)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        return (*grads, None, None, None, None, None, None, None)


def run(hs, ws, bs, ht, wt, bt, row_weights, opts: LossOptions, tuning: Tuning, scalar: bool, hard=None):
    """Registry entry point: (value, divergence, student_lse, teacher_lse, entropy, cross_entropy) on compacted rows."""
    if hard is not None:
        raise NotImplementedError("backend='triton' does not compute the hard-label cross-entropy yet")
    for name, t in (("student_hidden", hs), ("teacher_hidden", ht)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"backend='triton' supports fp32, fp16 and bf16 inputs; {name} is {t.dtype}")
    value, *stats = TritonDivergence.apply(hs, ws, bs, ht, wt, bt, row_weights, opts, tuning, scalar)
    return (value, *stats, torch.zeros_like(stats[0]))
