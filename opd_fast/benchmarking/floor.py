"""The bare-GEMM floor: the four matrix products any exact fused loss must perform.

Student logits ``h_s W_s^T``, teacher logits ``h_t W_t^T``, grad-hidden ``G W_s`` and grad-weight
``G^T h_s`` (``G`` = dL/dlogits), at the benchmarked shapes and dtype, over token chunks so the
floor itself needs no ``N x V`` buffer. The loss times are divided by this, measured in the same
run, so the ratio says how much a loss spends beyond its unavoidable GEMMs.
"""

from __future__ import annotations

import torch

from .inputs import BenchInputs

FLOOR_CHUNK_TOKENS = 1024


def gemm_floor_step(inputs: BenchInputs, chunk_tokens: int = FLOOR_CHUNK_TOKENS) -> None:
    """Run the four GEMMs once over all tokens (the student logits stand in for ``G``)."""
    hs, ws, ht, wt = inputs.hs.detach(), inputs.ws.detach(), inputs.ht, inputs.wt
    with torch.no_grad():
        grad_h = torch.empty_like(hs)
        grad_w = torch.zeros_like(ws)
        for r0 in range(0, hs.shape[0], chunk_tokens):
            h = hs[r0 : r0 + chunk_tokens]
            g = h @ ws.T
            ht[r0 : r0 + chunk_tokens] @ wt.T
            torch.mm(g, ws, out=grad_h[r0 : r0 + chunk_tokens])
            grad_w.addmm_(g.T, h)
