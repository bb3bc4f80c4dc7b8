"""Reproducible benchmark operands with the logit statistics of a trained LM.

Random N(0, 1) hidden states against N(0, 1) weights give logits with std sqrt(H) (~32 at
H=1024): softmax is then one-hot and every exp underflows, which flatters some kernels and
breaks others. Weights are scaled so both heads' logits have std ``LOGIT_STD``, and the teacher
operands are correlated with the student's so the divergence is that of a student that already
roughly agrees with its teacher (forward KL ~1 nat/token), as during distillation.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from .shapes import DTYPES, Shape

LOGIT_STD = 3.0
TEACHER_CORRELATION = 0.9  # per operand; the logits correlate at about its square
TEMPERATURE = 1.0
_STD_SAMPLE_ROWS = 256


@dataclass
class BenchInputs:
    """Student leaves (with gradients) and teacher constants for one case."""

    hs: torch.Tensor
    ws: torch.Tensor
    ht: torch.Tensor
    wt: torch.Tensor

    def clear_grads(self) -> None:
        self.hs.grad = None
        self.ws.grad = None

    def rows(self, k: int) -> BenchInputs:
        """The first ``k`` tokens with fresh leaves (the weights are shared values, new leaves)."""
        return BenchInputs(
            self.hs[:k].detach().clone().requires_grad_(True),
            self.ws.detach().clone().requires_grad_(True),
            self.ht[:k],
            self.wt,
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hs, self.ws, self.ht, self.wt))


def case_seed(seed: int, shape: Shape, dtype: str) -> int:
    """A per-case seed, so every case draws fresh inputs yet any case can be rerun alone."""
    key = f"{seed}:{shape.n}:{shape.v}:{shape.h_s}:{shape.h_t}:{dtype}".encode()
    return zlib.crc32(key)


def _correlated(base: torch.Tensor, width: int, gen: torch.Generator) -> torch.Tensor:
    """``c * base + sqrt(1 - c^2) * noise``, with ``base`` cut or zero-padded to ``width`` columns."""
    c = TEACHER_CORRELATION
    shared = torch.nn.functional.pad(base[:, :width], (0, max(0, width - base.shape[1])))
    return c * shared + math.sqrt(1 - c * c) * torch.randn(base.shape[0], width, generator=gen)


def _scaled_to_logit_std(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rescaled so that ``hidden @ weight.T`` has standard deviation ``LOGIT_STD``."""
    std = (hidden[:_STD_SAMPLE_ROWS] @ weight.T).std()
    return weight * (LOGIT_STD / float(std))


def make_inputs(
    shape: Shape, dtype: str, seed: int, device: str | torch.device = "cpu"
) -> BenchInputs:
    """Fresh (never zero) operands for one case; identical for the same seed, shape and dtype."""
    gen = torch.Generator().manual_seed(case_seed(seed, shape, dtype))
    hs = torch.randn(shape.n, shape.h_s, generator=gen)
    ws = torch.randn(shape.v, shape.h_s, generator=gen)
    ht = _correlated(hs, shape.h_t, gen)
    wt = _correlated(ws, shape.h_t, gen)
    ws, wt = _scaled_to_logit_std(hs, ws), _scaled_to_logit_std(ht, wt)
    dt = DTYPES[dtype]

    def put(t: torch.Tensor, grad: bool) -> torch.Tensor:
        return t.to(device=device, dtype=dt).requires_grad_(grad)

    return BenchInputs(put(hs, True), put(ws, True), put(ht, False), put(wt, False))
