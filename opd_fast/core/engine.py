"""The interface every backend implements, and the one autograd Function that drives it.

An *engine* sweeps the compacted token rows of one loss call and returns per-row outputs
(divergence, cross-entropy, log-prob, entropy, log-sum-exps...), the first
``n_differentiable`` of which depend on the student's hidden states, LM-head weight and bias.
Everything else (teacher tensors, options, chunking) the engine holds from its construction.

``FusedLoss`` owns the two ways a loss is differentiated:

* **scalar loss** (reduction ``mean`` / ``sum``): each differentiable output's per-row
  coefficient is known before the sweep, so the engine accumulates the student gradients of
  ``sum_j sum_i c_ji out_ji`` *during the forward sweep*; backward only scales them (a plain
  ``loss.backward()`` costs nothing more);
* **per-row outputs** (``reduction="none"``, log-probs): the forward returns the outputs
  themselves, differentiable, and backward calls the engine again with the incoming per-row
  gradients (and whatever state the forward left, e.g. log-sum-exps it need not recompute).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

Upstream = Sequence[torch.Tensor | None]

# What each kind of engine returns per row, named once for every backend (the differentiable ones first).
TEACHER_HEAD_OUTPUTS = ("divergence", "cross_entropy", "student_lse", "teacher_lse", "student_entropy")


def topk_outputs(entropy: bool) -> tuple[str, ...]:
    """The top-k teacher's per-row outputs (the divergence is differentiable; the entropy costs a pass)."""
    stats = ("divergence", "student_lse", "student_topk_mass")
    return (*stats, "student_entropy") if entropy else stats


def logprob_outputs(entropy: bool) -> tuple[str, ...]:
    """The sampled tokens' per-row outputs, all differentiable."""
    return ("logprob", "entropy") if entropy else ("logprob",)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; float64 stays float64 (gradcheck, references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Student(NamedTuple):
    """The differentiable operands: compacted hidden rows ``(n, H)``, LM-head weight ``(V, H)``, bias."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class Want:
    """Which student gradients autograd asked for."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


@dataclass
class StudentGrads:
    """Gradients of the student operands (None where not wanted); weight/bias may be fp32 accumulators."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def scaled(self, factor: torch.Tensor) -> StudentGrads:
        """Every gradient times the scalar ``factor`` (the incoming gradient of a scalar loss)."""
        if not bool(factor != 1):  # a plain loss.backward() passes 1: skip three full-size passes
            return self
        return StudentGrads(*(None if g is None else g * factor.to(g.dtype) for g in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return self.hidden, self.weight, self.bias


class EngineResult(NamedTuple):
    """One sweep's per-row outputs (``Engine.output_names`` order), gradients and reusable state."""

    outputs: tuple[torch.Tensor, ...]
    grads: StudentGrads | None
    state: Any = None  # handed back to a gradient-only call of the same engine (None: nothing kept)


class Engine(Protocol):
    """One backend's sweep for one loss call.

    ``run(student, upstream, want, state)``: with ``upstream`` (one per-row tensor or None per
    differentiable output) also return the student gradients of ``sum_j sum_i upstream_ji out_ji``
    for the operands in ``want``. ``state`` is what an earlier ``run`` on the same rows returned.
    """

    output_names: tuple[str, ...]
    n_differentiable: int

    def run(self, student: Student, upstream: Upstream | None, want: Want, state: Any = None) -> EngineResult: ...


class FusedLoss(torch.autograd.Function):
    """``FusedLoss.apply(engine, coefficients, hidden, weight, bias)``.

    ``coefficients`` (one per-row tensor or None per differentiable output): returns
    ``(sum_j (c_j * out_j).sum(), *outputs)``, the outputs detached, the gradients computed in
    the forward sweep. ``None``: returns the per-row ``outputs``, the first
    ``engine.n_differentiable`` differentiable; backward re-runs the engine with their gradients.
    """

    @staticmethod
    def forward(ctx, engine: Engine, coefficients: Upstream | None, hidden, weight, bias):
        want = Want(*ctx.needs_input_grad[2:4], bias is not None and ctx.needs_input_grad[4])
        ctx.set_materialize_grads(False)
        # A scalar loss's backward needs only its stored gradients: the engine (and the teacher rows it
        # holds) is kept for the per-row mode alone, so scalar losses free it after the forward.
        ctx.engine = engine if coefficients is None else None
        ctx.want, ctx.scalar = want, coefficients is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        student = Student(hidden, weight, bias)
        # The call fixed the compute dtype; autocast must not re-round the fp32 tile math inside.
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            if coefficients is None:
                result = engine.run(student, None, want)
                ctx.state = result.state
                ctx.save_for_backward(hidden, weight, bias)
                ctx.mark_non_differentiable(*result.outputs[engine.n_differentiable :])
                return result.outputs
            coefficients = [*coefficients, *[None] * (engine.n_differentiable - len(coefficients))]
            result = engine.run(student, coefficients if want.any else None, want)
            grads = result.grads or StudentGrads()
            ctx.save_for_backward(*grads.as_tuple())
            value = sum(
                (c * out).sum() for c, out in zip(coefficients, result.outputs, strict=False) if c is not None
            )
            ctx.mark_non_differentiable(*result.outputs)
            return (torch.as_tensor(value, dtype=result.outputs[0].dtype), *result.outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        nothing = (None,) * 5
        if ctx.scalar:
            if grad_outputs[0] is None:
                return nothing
            grads = StudentGrads(*ctx.saved_tensors).scaled(grad_outputs[0])
        else:
            engine = ctx.engine
            hidden, weight, bias = ctx.saved_tensors
            acc = accum_dtype(hidden.dtype)
            upstream = [None if g is None else g.to(acc) for g in grad_outputs[: engine.n_differentiable]]
            if all(u is None for u in upstream):
                return nothing
            with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
                grads = engine.run(Student(hidden, weight, bias), upstream, ctx.want, ctx.state).grads
        cast = [None if g is None else g.to(dtype) for g, dtype in zip(grads.as_tuple(), ctx.dtypes, strict=True)]
        return (None, None, *cast)
