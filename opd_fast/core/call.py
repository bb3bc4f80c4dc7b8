"""One description of a fused loss call: typed, immutable, validated once.

The public functions (``fused_linear_kl``, ``fused_linear_kl_topk``, ``fused_linear_logprobs``)
turn their arguments into a ``LossCall`` (``validation``); the float64 reference and every
backend read that and nothing else. The student is always a head (hidden states + LM head); the
teacher's signal is one of three kinds:

* ``TeacherHead``   - the teacher's hidden states and LM head (the full distribution);
* ``TopKTeacher``   - the teacher's top-k ids and log-probs per token (e.g. a served teacher);
* ``SampledTokens`` - token ids only: the loss is the student's log-prob of each (and entropy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]
Reduction = Literal["mean", "sum", "none"]
Tail = Literal["bucket", "renormalize"]
Backend = Literal["auto", "torch", "cpu", "triton", "reference"]
TritonMode = Literal["strict", "cached"]

DIVERGENCES: tuple[Divergence, ...] = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum", "none")
TAILS: tuple[Tail, ...] = ("bucket", "renormalize")
BACKEND_NAMES: tuple[Backend, ...] = ("auto", "torch", "cpu", "triton", "reference")
TRITON_MODES: tuple[TritonMode, ...] = ("strict", "cached")
TOPK_PAD_ID = -1  # a top-k slot holding this id is padding: it is ignored, whatever its log-prob
# Lowest teacher tail mass in tail="bucket": served log-probs are rounded, and a top-k that sums to
# one exactly would make reverse KL infinite as soon as the student keeps any mass outside it.
TOPK_TAIL_FLOOR = 1e-9


@dataclass(frozen=True)
class Tuning:
    """Chunking knobs of the fused backends. ``None`` means "choose from the shapes".

    ``grad_filter_eps``: skip the gradient GEMMs of every ``filter_block``-wide vocab block in
    which all |dL/dlogit| of the chunk are below ``eps`` (an absolute threshold on the gradient
    of the *reduced* loss, so it already includes the reduction's 1/num_items; Cut
    Cross-Entropy's gradient filtering). The error it introduces is at most
    ``eps * sum_v |W_v|`` per row of grad-hidden and ``eps * sum_i |h_i|`` per row of
    grad-weight, summed over skipped blocks; it is off by default because no fixed eps keeps
    that bound under every dtype's tolerance for every input. (On Triton the unit is a kernel
    tile, whose gradient is then stored as zeros: the same values, no time saved.)

    On Triton, ``memory_budget_mb`` (or ``chunk_vocab``, when set) sizes the vocabulary stripe of
    the gradient pass: an ``N x V_c`` logit-gradient buffer handed to the gradient GEMMs.

    ``triton_mode`` (the two-head loss on the Triton backend; other backends ignore it):
    ``"strict"`` keeps extra memory O(N + V) and recomputes logit tiles per pass (1.6-2.2x the
    GEMM floor's FLOPs); ``"cached"`` computes each head's logits once per token chunk (16-bit inputs: an
    fp16 tile-shifted cache from a Triton GEMM; fp32: torch matmul's fp32 logits) and runs one Triton row
    kernel on them (the floor's FLOPs, 4 bytes per chunk logit for 16-bit inputs, 8 for fp32, the gradient
    written in place: give it ``memory_budget_mb`` of ~1 GB so chunks hold ~2000 tokens at V = 128k).
    """

    chunk_tokens: int | None = None
    chunk_vocab: int | None = None
    memory_budget_mb: float = 256.0
    grad_filter_eps: float | None = None
    filter_block: int = 512
    triton_mode: TritonMode = "strict"

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "chunk_vocab"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Tuning.{name} must be a positive int or None, got {value!r}")
        if self.memory_budget_mb <= 0:
            raise ValueError(f"Tuning.memory_budget_mb must be > 0, got {self.memory_budget_mb!r}")
        if self.grad_filter_eps is not None and self.grad_filter_eps < 0:
            raise ValueError(f"Tuning.grad_filter_eps must be >= 0 or None, got {self.grad_filter_eps!r}")
        if self.triton_mode not in TRITON_MODES:
            raise ValueError(f"Tuning.triton_mode must be one of {TRITON_MODES}, got {self.triton_mode!r}")


@dataclass(frozen=True)
class HeadSpec:
    """How one side turns hidden states into logits: ``softcap(scale * (h @ W[:K]^T + b[:K])) / T``."""

    scale: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class LossOptions:
    """The scalar options of a call (everything but the tensors), as the kernels read them.

    Log-prob calls use ``temperature``, ``student`` and ``vocab_size`` only.
    """

    divergence: Divergence
    beta: float
    temperature: float
    temperature_sq_scaling: bool
    reduction: Reduction
    num_items: float | None
    student: HeadSpec
    teacher: HeadSpec
    vocab_size: int
    hard_weight: float = 0.0  # weight of the hard-label cross-entropy (fused_linear_kl with labels)

    @property
    def loss_scale(self) -> float:
        """Factor applied to every per-token divergence (T^2 when requested)."""
        return self.temperature**2 if self.temperature_sq_scaling else 1.0


@dataclass(frozen=True)
class Head:
    """Hidden states ``(..., H)`` and the LM head ``(V, H)`` / bias ``(V,)`` they meet."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class TeacherHead:
    """The teacher's own head (detached: the teacher is a constant).

    ``lse``: the teacher's per-token log-sum-exp when the caller already has it (a frozen teacher
    scored once, several optimizer steps on its rollout): leading shape, accumulation dtype.
    """

    head: Head
    lse: torch.Tensor | None = None


@dataclass(frozen=True)
class TopKTeacher:
    """The teacher's top-k per token: ids ``(..., k)`` (``TOPK_PAD_ID`` = padding) and log-probs."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: Tail


@dataclass(frozen=True)
class SampledTokens:
    """Token ids ``(...)``: the call returns the student's log-prob of each (and its entropy)."""

    ids: torch.Tensor


TeacherSignal = TeacherHead | TopKTeacher | SampledTokens


@dataclass(frozen=True)
class HardLabelArgs:
    """Ground-truth ids ``(...)`` for the hard-label cross-entropy; ``ignore_index`` marks none."""

    labels: torch.Tensor
    ignore_index: int


@dataclass(frozen=True)
class VocabShard:
    """This rank's contiguous slice of a vocabulary sharded over a process group (Megatron-style).

    Rank ``r`` holds rows ``[offset, offset + rows)`` of every head, the ranks' slices in rank order
    tiling ``[0, sum(rows_per_rank))``; hidden states and per-token tensors are replicated.
    """

    group: Any  # a torch.distributed ProcessGroup
    rank: int
    rows_per_rank: tuple[int, ...]

    @property
    def offset(self) -> int:
        return sum(self.rows_per_rank[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.rows_per_rank)

    def compared(self, vocab: int, rank: int | None = None) -> int:
        """How many of a rank's rows (this rank's by default) fall inside the first ``vocab`` entries."""
        r = self.rank if rank is None else rank
        start = sum(self.rows_per_rank[:r])
        return max(0, min(self.rows_per_rank[r], vocab - start))

    def widest(self, vocab: int) -> int:
        """The most compared rows any rank holds: every rank plans the same token chunks from it."""
        return max(self.compared(vocab, r) for r in range(len(self.rows_per_rank)))


@dataclass(frozen=True)
class LossCall:
    """A validated call. ``mask`` (bool) and ``token_weights`` have the leading shape or are None."""

    student: Head
    teacher: TeacherSignal
    options: LossOptions
    backend: Backend
    return_stats: bool  # per-token statistics; for log-probs, the entropy
    tuning: Tuning
    mask: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    hard: HardLabelArgs | None = None
    shard: VocabShard | None = None  # set when the heads are vocabulary shards (``process_group=``)

    @property
    def leading(self) -> tuple[int, ...]:
        return tuple(self.student.hidden.shape[:-1])
