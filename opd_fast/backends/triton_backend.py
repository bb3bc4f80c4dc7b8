"""The Triton backend: availability, launch planning and the autograd glue of the three passes.

``run`` has the registry's uniform signature (compacted 2-D rows, per-row coefficients; see
``opd_fast/backends/__init__.py``). Passes (``backends/triton/``): 1 log-sum-exps, 2 per-row
divergence / coefficient / entropy (one sweep does both for the KLs), 3 student gradients. For
scalar reductions (mean, sum) pass 3 runs inside the forward with the row coefficients, and
backward only scales the stored gradients; with ``reduction="none"`` the forward keeps
per-row statistics and backward runs pass 3 with ``incoming gradient x row coefficient``.
Hard labels ride along: pass 2 gathers the label logits (and at T != 1 the log-sum-exp of
``T z``), pass 3 adds the cross-entropy's gradient to the same register tile.

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
from .tile_math import HardLabels
from .triton import launch_grad, launch_row_stats, pick_config
from .triton.common import INTERPRET
from .triton.terms import RowStats

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


def device_arch(device: torch.device) -> int | None:
    if INTERPRET or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _tile_dtype(hs: torch.Tensor, ht: torch.Tensor) -> torch.dtype:
    """The dtype that sizes the tiles: fp32 (tf32x3 products, K slices of 16) if either head is fp32."""
    return torch.float32 if torch.float32 in (hs.dtype, ht.dtype) else hs.dtype


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU (Triton launches on the current device), no-op elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def vocab_splits(device: torch.device, n_rows: int, vocab: int, block_m: int, block_n: int) -> int:
    """Vocabulary splits so that (row blocks x splits) covers the GPU; 1 when rows alone do."""
    if device_arch(device) is None:
        target = _INTERPRETER_PROGRAMS
    else:
        target = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = max(1, -(-n_rows // block_m))
    return max(1, min(-(-target // row_blocks), -(-vocab // block_n)))


def _student_grads(hs, ws, bs, ht, wt, bt, stats: RowStats, row_scale, hard: HardLabels | None, opts, want,
                   tuning: Tuning):  # fmt: skip
    n, k = hs.shape[0], opts.vocab_size
    config = pick_config("grad", device_arch(hs.device), _tile_dtype(hs, ht), n)
    splits = vocab_splits(hs.device, n, k, config.block_m, config.block_n)
    return launch_grad(hs, ws, bs, ht, wt, bt, stats.student_lse, stats.teacher_lse, stats.coef, row_scale, opts, want,
                       config, splits, tuning.grad_filter_eps, hard, stats.hard_lse)


class TritonDivergence(torch.autograd.Function):
    """Autograd glue: inputs are compacted 2-D rows; returns (values, *per-row stats).

    ``labels`` / ``hard_scale`` (None without hard labels): each row's label (-1 = none) and the
    coefficient of its cross-entropy in the value, as in ``chunked.ChunkedDivergence``.
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, row_weights, labels, hard_scale, opts: LossOptions, tuning: Tuning,
                scalar: bool):  # fmt: skip
        want = (hs.requires_grad, ws.requires_grad, bs is not None and bs.requires_grad)
        n, k = hs.shape[0], opts.vocab_size
        config = pick_config("lse", device_arch(hs.device), _tile_dtype(hs, ht), n)
        splits = vocab_splits(hs.device, n, k, config.block_m, config.block_n)
        row_weights = row_weights.float()
        hard = None
        if labels is not None:
            labels = labels.contiguous()
            hard = HardLabels(labels, hard_scale.float().contiguous())
        with torch.no_grad(), on_device(hs.device):
            stats = launch_row_stats(hs, ws, bs, ht, wt, bt, opts, config, splits, labels)
            value = stats.divergence * row_weights
            if hard is not None:
                value += stats.cross_entropy * hard.scale
            if scalar:
                value = value.sum()
                grads = (None, None, None)
                if any(want):
                    grads = _student_grads(hs, ws, bs, ht, wt, bt, stats, row_weights, hard, opts, want, tuning)
                ctx.save_for_backward(*grads)
            else:
                ctx.save_for_backward(hs, ws, bs, ht, wt, bt, row_weights, *(stats[:5]), stats.hard_lse,
                                      *((None, None) if hard is None else hard))
        ctx.meta = (opts, tuning, scalar, want)
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        ce = torch.zeros_like(stats.divergence) if hard is None else stats.cross_entropy
        out = (stats.divergence, stats.student_lse, stats.teacher_lse, stats.entropy, ce)
        ctx.mark_non_differentiable(*out)
        return (value, *out)

    @staticmethod
    def backward(ctx, grad_value, *_):
        opts, tuning, scalar, want = ctx.meta
        if scalar:
            grads = [None if g is None else g * grad_value for g in ctx.saved_tensors]
        else:
            hs, ws, bs, ht, wt, bt, row_weights, *per_row, hard_lse, labels, hard_scale = ctx.saved_tensors
            stats = RowStats(*per_row, hard_lse=hard_lse)
            grad_value = grad_value.float()
            row_scale = (grad_value * row_weights).contiguous()
            hard = None if labels is None else HardLabels(labels, (grad_value * hard_scale).contiguous())
            with torch.no_grad(), on_device(hs.device):
                grads = _student_grads(hs, ws, bs, ht, wt, bt, stats, row_scale, hard, opts, want, tuning)
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        return (*grads, None, None, None, None, None, None, None, None, None)


def run(hs, ws, bs, ht, wt, bt, row_weights, opts: LossOptions, tuning: Tuning, scalar: bool,
        hard: HardLabels | None = None):  # fmt: skip
    """Registry entry point: (value, divergence, student_lse, teacher_lse, entropy, cross_entropy) on compacted rows."""
    for name, t in (("student_hidden", hs), ("teacher_hidden", ht)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"backend='triton' supports fp32, fp16 and bf16 inputs; {name} is {t.dtype}")
    labels, hard_scale = (None, None) if hard is None else hard
    return TritonDivergence.apply(hs, ws, bs, ht, wt, bt, row_weights, labels, hard_scale, opts, tuning, scalar)
