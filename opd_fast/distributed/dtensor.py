"""DTensor (FSDP2 / tensor-parallel) operands of the fused losses: gathered once per call.

The engines run plain tensor GEMMs on the whole head. A DTensor operand is materialized with
``full_tensor()``, which is differentiable: its gradient goes back through DTensor's own
redistribution, so it arrives on the DTensor with the DTensor's placements, exactly as if the
caller had written ``loss(h, weight.full_tensor())``. The gathered copy lives for the call only.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def gathered(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a plain tensor: a DTensor is gathered (differentiably), anything else is returned as is."""
    return t.full_tensor() if is_dtensor(t) else t
