"""opd-fast: fast on-policy distillation of language models.

Public API: ``fused_linear_kl`` / ``FusedLinearKL`` (fused teacher-student divergence from
hidden states and LM heads), ``fused_linear_kl_topk`` (from a teacher's top-k log-probs),
``fused_linear_logprobs`` (per-token log-probs and entropy), ``reference`` (the float64
math contract), ``Tuning`` (chunking knobs) and ``available_backends``; ``ops`` holds the losses as
``torch.library`` custom ops (``torch.compile(fullgraph=True)``), ``distributed`` the multi-process helpers.
"""

from __future__ import annotations

import torch

from . import reference
from .core import ops
from .core.call import BACKEND_NAMES, Tuning
from .core.dispatch import availability
from .logprobs import fused_linear_logprobs
from .loss import FusedLinearKL, fused_linear_kl
from .topk import fused_linear_kl_topk

__version__ = "0.1.0"


def available_backends(device: str | torch.device = "cpu") -> dict[str, str]:
    """Each concrete backend on ``device`` mapped to "" when usable, else the reason it is not."""
    dev = torch.device(device)
    return {name: availability(name, dev)[1] for name in BACKEND_NAMES if name != "auto"}


__all__ = [
    "FusedLinearKL",
    "Tuning",
    "__version__",
    "available_backends",
    "fused_linear_kl",
    "fused_linear_kl_topk",
    "fused_linear_logprobs",
    "ops",
    "reference",
]
