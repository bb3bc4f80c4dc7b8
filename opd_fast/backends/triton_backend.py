"""The Triton backend of the two-head divergence: availability, launch planning, its ``Engine``.

Passes (``backends/triton/``): 1 log-sum-exps, 2 per-row divergence / coefficient / entropy (one
sweep does both for the KLs), 3 student gradients. ``TritonEngine.run`` with upstream
coefficients runs pass 3 right after the statistics (the forward of a scalar loss); a
gradient-only call reuses the statistics the forward left. Hard labels ride along: pass 2 gathers
the label logits (and at T != 1 the log-sum-exp of ``T z``), pass 3 adds the cross-entropy's
gradient to the same register tile.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, and ``backend="triton"`` is
offered for them, so anyone can check the kernels' numerics without a GPU (slowly).
"""

from __future__ import annotations

import contextlib

import torch

from ..core.call import LossOptions, Tuning
from ..core.engine import TEACHER_HEAD_OUTPUTS, EngineResult, Student, StudentGrads, Upstream, Want
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


def check_dtypes(**tensors: torch.Tensor) -> None:
    """The kernels' operand dtypes: fp32, fp16 and bf16 (float64 has no tensor-core path)."""
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"backend='triton' supports fp32, fp16 and bf16 inputs; {name} is {t.dtype}")


class TritonEngine:
    """The two-head divergence on the Triton kernels (``chunked.ChunkedEngine``'s outputs)."""

    output_names = TEACHER_HEAD_OUTPUTS
    n_differentiable = 2

    def __init__(self, teacher: Student, opts: LossOptions, tuning: Tuning, labels: torch.Tensor | None) -> None:
        check_dtypes(teacher_hidden=teacher.hidden)
        self.teacher, self.opts, self.tuning = teacher, opts, tuning
        self.labels = None if labels is None else labels.contiguous()

    def _stats(self, student: Student) -> RowStats:
        hs, n = student.hidden, student.hidden.shape[0]
        config = pick_config("lse", device_arch(hs.device), _tile_dtype(hs, self.teacher.hidden), n)
        splits = vocab_splits(hs.device, n, self.opts.vocab_size, config.block_m, config.block_n)
        return launch_row_stats(*student, *self.teacher, self.opts, config, splits, self.labels)

    def _grads(self, student: Student, stats: RowStats, upstream: Upstream, want: Want) -> StudentGrads:
        hs, n = student.hidden, student.hidden.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=hs.device)
        row_scale, hard_scale = (zeros if u is None else u.float().contiguous() for u in upstream)
        hard = None if self.labels is None else HardLabels(self.labels, hard_scale)
        config = pick_config("grad", device_arch(hs.device), _tile_dtype(hs, self.teacher.hidden), n)
        splits = vocab_splits(hs.device, n, self.opts.vocab_size, config.block_m, config.block_n)
        grads = launch_grad(*student, *self.teacher, stats.student_lse, stats.teacher_lse, stats.coef, row_scale,
                            self.opts, (want.hidden, want.weight, want.bias), config, splits,
                            self.tuning.grad_filter_eps, hard, stats.hard_lse)
        return StudentGrads(*grads)

    def run(self, student: Student, upstream: Upstream | None, want: Want, state: RowStats | None = None,
            ) -> EngineResult:
        check_dtypes(student_hidden=student.hidden)
        with on_device(student.hidden.device):
            stats = self._stats(student) if state is None else state
            grads = None if upstream is None else self._grads(student, stats, upstream, want)
        ce = torch.zeros_like(stats.divergence) if stats.cross_entropy is None else stats.cross_entropy
        outputs = (stats.divergence, ce, stats.student_lse, stats.teacher_lse, stats.entropy)
        return EngineResult(outputs, grads, stats)
