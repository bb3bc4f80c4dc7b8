"""Native row kernels of the single-head losses: ``fused_linear_logprobs`` and ``fused_linear_kl_topk``.

``rows.sweep_rows`` runs the chunk loop and the GEMMs; these kernels replace the torch per-row
math (``row_math.LogProbRows``, ``row_math.TopKRows``) with one C++ call per chunk
(``opd_logprob_rows`` / ``opd_topk_rows`` in ``kernels/``). They take the *raw* GEMM tile
(``takes_raw_logits``): softcap, temperature and their chain rule run inside the kernel, and the
gradient is written over the tile in its own dtype, so a chunk holds no fp32 copy of a bf16 tile.

Each wraps the torch kernel it replaces: that one keeps the per-call preprocessing (the top-k
teacher's category log-probs, padding masks) and still runs float64 tiles (gradcheck, references).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from ..core.call import HeadSpec, LossOptions
from ..core.engine import Upstream
from .cpu_native import (
    DIVERGENCE_IDS,
    NativeOptions,
    TopKOptions,
    address,
    check,
    grad_args,
    library,
    row_floats,
    row_major,
    tile,
)
from .row_math import LogProbRows, TopKRows
from .tile_math import finish_logits, logits_grad_to_raw

__all__ = ["NativeLogProbRows", "NativeTopKRows"]


class _NativeRows(NativeOptions):
    """Shared part: the wrapped torch kernel's outputs, and its float64 path on final logits."""

    takes_raw_logits = True

    def __init__(self, torch_rows: LogProbRows | TopKRows, spec: HeadSpec, temperature: float, **native: Any) -> None:
        super().__init__(**native)
        self.torch_rows, self.spec, self.temperature = torch_rows, spec, float(temperature)
        self.output_names, self.n_differentiable = torch_rows.output_names, torch_rows.n_differentiable

    def live_bytes_per_logit(self, dtype: torch.dtype) -> int | None:
        """The raw tile only (the gradient overwrites it; fp16 adds an fp32 copy); float64: the torch kernel's."""
        if dtype == torch.float64:
            return None
        return dtype.itemsize + (4 if dtype not in (torch.float32, torch.bfloat16) else 0)

    def __call__(
        self, raw: torch.Tensor, rows: slice, upstream: Upstream | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if raw.dtype == torch.float64:
            return self._torch(raw, rows, upstream)
        raw = row_major(raw)
        out = torch.empty(len(self.output_names), raw.shape[0], dtype=torch.float32)
        return self._native(raw, rows, upstream, out)

    def _torch(
        self, raw: torch.Tensor, rows: slice, upstream: Upstream | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The wrapped torch kernel on the final logits, its gradient chained back to the raw tile."""
        z = finish_logits(raw, self.spec, self.temperature)
        values, grad = self.torch_rows(z, rows, upstream)
        return values, None if grad is None else logits_grad_to_raw(grad, z, self.spec, self.temperature)

    def _native(
        self, raw: torch.Tensor, rows: slice, upstream: Upstream | None, out: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The native call on a row-major fp32/bf16 tile; per-row outputs go to ``out`` (outputs, n)."""
        raise NotImplementedError


class NativeLogProbRows(_NativeRows):
    """``log q(y)`` (and the entropy) per row and their gradient, in ``opd_logprob_rows``."""

    def _native(
        self, raw: torch.Tensor, rows: slice, upstream: Upstream | None, out: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        n, k = raw.shape
        ids = self.torch_rows.token_ids[rows].contiguous()
        up = [row_floats(u) for u in upstream] if upstream is not None else [None] * self.n_differentiable
        u_lp, u_ent = up[0], up[1] if self.torch_rows.entropy else None
        status = library().opd_logprob_rows(
            tile(raw), n, k, self.temperature, self.spec.softcap or 0.0, ids.data_ptr(), address(u_lp),
            address(u_ent), *grad_args(raw), out[0].data_ptr(), out[1].data_ptr() if self.torch_rows.entropy else None,
            *self.call_args(),
        )
        check(status, self.isa, f"log-prob tile {tuple(raw.shape)} {raw.dtype}")
        return list(out), raw if u_lp is not None or u_ent is not None else None


class NativeTopKRows(_NativeRows):
    """Divergence on the top-k categories, student LSE, top-k mass (and entropy), in ``opd_topk_rows``.

    Padding slots go to the kernel as id -1 (the torch kernel points them at a real id instead).
    """

    def __init__(self, torch_rows: TopKRows, opts: LossOptions, **native: Any) -> None:
        super().__init__(torch_rows, opts.student, opts.temperature, **native)
        cats = torch_rows.categories
        self.options = TopKOptions(
            DIVERGENCE_IDS[opts.divergence], opts.beta, opts.temperature, opts.student.softcap or 0.0, int(cats.bucket)
        )
        self.ids = torch.where(cats.valid, cats.ids, -1).contiguous()
        self.log_p = cats.log_p.to(torch.float32).contiguous()

    def _native(
        self, raw: torch.Tensor, rows: slice, upstream: Upstream | None, out: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        n, k = raw.shape
        ids, log_p = self.ids[rows], self.log_p[rows]
        scale = None if upstream is None else row_floats(upstream[0])  # None: no gradient wanted
        status = library().opd_topk_rows(
            tile(raw), n, k, ctypes.byref(self.options), ids.data_ptr(), ids.shape[1], ids.stride(0),
            log_p.data_ptr(), log_p.stride(0), address(scale), *grad_args(raw),
            *(o.data_ptr() for o in out), *([None] if len(self.output_names) == 3 else []), *self.call_args(),
        )
        check(status, self.isa, f"top-k tile {tuple(raw.shape)} {raw.dtype}, ids {tuple(ids.shape)}")
        return list(out), None if scale is None else raw
