"""The Triton backend of the two-head divergence: availability, launch planning, its ``Engine``.

Passes (``backends/triton/``): 1 log-sum-exps, 2 per-row divergence / coefficient / entropy (one
sweep does both for the KLs), 3 student gradients: logit-gradient stripes written by the kernel,
the grad GEMMs in torch (``triton/stripes.py``). ``TritonEngine.run`` with upstream
coefficients runs pass 3 right after the statistics (the forward of a scalar loss); a
gradient-only call reuses the statistics the forward left. Hard labels ride along: pass 2 gathers
the label logits (and at T != 1 the log-sum-exp of ``T z``), pass 3 adds the cross-entropy's
gradient to the same register tile.

A known teacher log-sum-exp (``teacher_lse=``) removes the teacher from pass 1 (JSD, TVD) and, for
forward KL with a scalar loss, replaces the two-head statistics sweep by a student-only pass 1:
the gradient pass sums the divergence and entropy from its own tiles (``grad``'s ``STATS``).

``Tuning(triton_mode="cached")`` swaps the passes for the cached mode (``triton/cached.py``): the
chunk loop of ``chunked.py`` with each head's logits cached once per chunk (16-bit inputs: the fp16
tile-shifted cache of ``triton/cached_logits.py``'s GEMM kernel; fp32: torch matmul) and one Triton
row kernel.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, and ``backend="triton"`` is
offered for them, so anyone can check the kernels' numerics without a GPU (slowly).
"""

from __future__ import annotations

import contextlib

import torch

from ..core.call import LossOptions, Tuning
from ..core.engine import TEACHER_HEAD_OUTPUTS, EngineResult, Student, StudentGrads, Upstream, Want
from .chunked import ChunkedEngine
from .tile_math import HardLabels
from .triton import BlockConfig, launch_grad, launch_lse, launch_row_stats, pick_config
from .triton.cached import TritonTileMath
from .triton.common import FORWARD_KL, INTERPRET, divergence_code
from .triton.stripes import StripePlan, stripe_width
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


def stripe_plan(device: torch.device, tuning: Tuning, n_rows: int, vocab: int, dtype: torch.dtype,
                config: BlockConfig) -> StripePlan:
    """Stripe width from the memory budget (``stripes.stripe_width``) and the vocabulary split filling the GPU."""
    width = stripe_width(tuning, n_rows, vocab, dtype, config.block_n)
    return StripePlan(width, vocab_splits(device, n_rows, min(width, vocab), config.block_m, config.block_n))


def check_dtypes(**tensors: torch.Tensor) -> None:
    """The kernels' operand dtypes: fp32, fp16 and bf16 (float64 has no tensor-core path)."""
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"backend='triton' supports fp32, fp16 and bf16 inputs; {name} is {t.dtype}")


class TritonEngine:
    """The two-head divergence on the Triton kernels (``chunked.ChunkedEngine``'s outputs)."""

    output_names = TEACHER_HEAD_OUTPUTS
    n_differentiable = 2

    def __init__(self, teacher: Student, opts: LossOptions, tuning: Tuning, labels: torch.Tensor | None,
                 teacher_lse: torch.Tensor | None = None) -> None:
        check_dtypes(teacher_hidden=teacher.hidden)
        self.teacher, self.opts, self.tuning = teacher, opts, tuning
        self.labels = None if labels is None else labels.contiguous()
        self.teacher_lse = None if teacher_lse is None else teacher_lse.float().contiguous()

    def _splits(self, kernel: str, student: Student) -> tuple[BlockConfig, int]:
        hs, n = student.hidden, student.hidden.shape[0]
        config = pick_config(kernel, device_arch(hs.device), _tile_dtype(hs, self.teacher.hidden), n)
        return config, vocab_splits(hs.device, n, self.opts.vocab_size, config.block_m, config.block_n)

    def _stats(self, student: Student) -> RowStats:
        return launch_row_stats(*student, *self.teacher, self.opts, self._splits("lse", student),
                                self._splits("terms", student), self.labels, self.teacher_lse)

    def _known_teacher_forward_kl(self, student: Student, upstream: Upstream, want: Want,
                                  ) -> tuple[RowStats, StudentGrads]:
        """Forward KL with the teacher's LSE given: student-only pass 1, then gradients and statistics in one sweep."""
        config, splits = self._splits("lse", student)
        lse_s, lse_t, ce, hard_lse = launch_lse(*student, *self.teacher, self.opts, config, splits, self.labels,
                                                self.teacher_lse)
        coef = torch.full_like(lse_s, -1.0)  # forward KL's c
        grads, (divergence, entropy) = self._grads(student, lse_s, lse_t, coef, hard_lse, upstream, want, True)
        return RowStats(lse_s, lse_t, divergence, coef, entropy, ce, hard_lse), grads

    def _grads(self, student: Student, lse_s: torch.Tensor, lse_t: torch.Tensor, coef: torch.Tensor,
               hard_lse: torch.Tensor | None, upstream: Upstream, want: Want, with_stats: bool = False,
               ) -> tuple[StudentGrads, tuple[torch.Tensor, torch.Tensor] | None]:
        """Student gradients (pass 3) and, ``with_stats``, per-row (divergence, entropy) from the same tiles."""
        hs, n = student.hidden, student.hidden.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=hs.device)
        row_scale, hard_scale = (zeros if u is None else u.float().contiguous() for u in upstream)
        hard = None if self.labels is None else HardLabels(self.labels, hard_scale)
        config = pick_config("grad", device_arch(hs.device), _tile_dtype(hs, self.teacher.hidden), n)
        plan = stripe_plan(hs.device, self.tuning, n, self.opts.vocab_size, student.weight.dtype, config)
        return launch_grad(student, self.teacher, lse_s, lse_t, coef, row_scale, self.opts, want, config, plan,
                           self.tuning.grad_filter_eps, hard, hard_lse, with_stats)

    def run(self, student: Student, upstream: Upstream | None, want: Want, state: RowStats | None = None,
            ) -> EngineResult:
        check_dtypes(student_hidden=student.hidden)
        fused = (state is None and upstream is not None and want.any and self.teacher_lse is not None
                 and divergence_code(self.opts.divergence, self.opts.beta) == FORWARD_KL)
        with on_device(student.hidden.device):
            if fused:
                stats, grads = self._known_teacher_forward_kl(student, upstream, want)
            else:
                stats = self._stats(student) if state is None else state
                grads = None if upstream is None else self._grads(
                    student, stats.student_lse, stats.teacher_lse, stats.coef, stats.hard_lse, upstream, want)[0]
        ce = torch.zeros_like(stats.divergence) if stats.cross_entropy is None else stats.cross_entropy
        outputs = (stats.divergence, ce, stats.student_lse, stats.teacher_lse, stats.entropy)
        return EngineResult(outputs, grads, stats)


def two_head_engine(teacher: Student, opts: LossOptions, tuning: Tuning, labels: torch.Tensor | None,
                    teacher_lse: torch.Tensor | None = None) -> TritonEngine | ChunkedEngine:
    """The Triton backend's engine for ``tuning.triton_mode``: strict kernels, or the cached chunk loop."""
    if tuning.triton_mode == "cached":
        check_dtypes(teacher_hidden=teacher.hidden)
        tiles = TritonTileMath()
        return ChunkedEngine(teacher, opts, tiles, tuning, labels, teacher_lse, row_logits=tiles)
    return TritonEngine(teacher, opts, tuning, labels, teacher_lse)
