"""Correct before timed: each implementation against the float64 reference on the case's inputs.

The reference materializes float64 logits, so the check runs on the first ``CHECK_ROWS`` tokens
of the very inputs that will be timed (full vocabulary, same weights): a wrong beta convention,
reduction or gradient shows up there as clearly as on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference
from .implementations import Implementation
from .inputs import TEMPERATURE, BenchInputs

CHECK_ROWS = 128
# Relative (Frobenius) error allowed on the loss and on each student gradient.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


@dataclass(frozen=True)
class Check:
    """Largest relative error over loss, grad-hidden and grad-weight, and whether it passed."""

    max_rel_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.tolerance


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _loss_and_grads(loss: torch.Tensor, x: BenchInputs) -> tuple[torch.Tensor, ...]:
    loss.backward()
    return loss.detach(), x.hs.grad, x.ws.grad


def reference_outputs(inputs: BenchInputs, divergence: str, beta: float) -> tuple[torch.Tensor, ...]:
    """Reference loss and student gradients on the checked rows (computed once per case)."""
    x = inputs.rows(min(CHECK_ROWS, inputs.hs.shape[0]))
    loss = reference.fused_linear_kl(
        x.hs, x.ws, x.ht, x.wt, divergence=divergence, beta=beta, temperature=TEMPERATURE
    )
    return _loss_and_grads(loss, x)


def check(
    impl: Implementation, inputs: BenchInputs, dtype: str, divergence: str, beta: float,
    want: tuple[torch.Tensor, ...],
) -> Check:
    """Compare ``impl``'s loss and gradients on the checked rows with ``want`` (the reference's)."""
    x = inputs.rows(min(CHECK_ROWS, inputs.hs.shape[0]))
    got = _loss_and_grads(impl.make_loss(divergence, beta)(x.hs, x.ws, x.ht, x.wt), x)
    err = max(_rel_err(g, w) for g, w in zip(got, want, strict=True))
    return Check(err, TOLERANCE[dtype])
