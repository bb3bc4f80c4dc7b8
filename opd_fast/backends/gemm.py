"""Matrix products whose result is wider than their operands: 16-bit inputs, fp32 output.

A 16-bit GEMM accumulates in fp32 and then rounds its result to 16 bits. Where that result is a
logit (the chunk loop's vocabulary-tiled regime under the Triton cached mode) or a partial sum
(grad-hidden summed over vocabulary stripes), the rounding is an error the strict kernels never
make: a bf16 logit of magnitude 20 is off by up to 0.06. ``matmul_fp32`` keeps the accumulator instead:

* on CUDA, ``torch.mm(..., out_dtype=torch.float32)`` (cuBLAS writes its fp32 accumulator; the same
  FLOPs, twice the output bytes);
* elsewhere (CPU, the Triton interpreter's tensors), the operands are upcast: products of 16-bit
  numbers are exact in fp32, so only the summation order differs;
* a CUDA torch without ``out_dtype`` for the pair falls back to the rounded product, once warned.
"""

from __future__ import annotations

import warnings

import torch

_cuda_out_dtype = True  # cleared the first time a CUDA torch refuses out_dtype


def matmul_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` in fp32 (into ``out`` when given) for 2-D ``a``, ``b`` of one floating dtype."""
    global _cuda_out_dtype
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b, out=out)
    if a.device.type == "cuda" and _cuda_out_dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError) as exc:
            _cuda_out_dtype = False
            warnings.warn(f"torch.mm(out_dtype=float32) is not available for {a.dtype} on this torch ({exc}); "
                          f"16-bit products are rounded to {a.dtype} before they are widened", stacklevel=2)
    product = a @ b if a.device.type == "cuda" else a.float() @ b.float()
    if out is None:
        return product.float()
    return out.copy_(product)
