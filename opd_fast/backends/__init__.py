"""Backend registry: which implementations exist, which are usable here, and why not.

``resolve(name, device)`` is the single dispatch point of every public loss. A backend
module registers a ``run`` callable with the uniform signature used by ``opd_fast.loss``:

    run(hs, ws, bs, ht, wt, bt, row_weights, opts, tuning, scalar, hard=None)
        -> (value, divergence, student_lse, teacher_lse, student_entropy, cross_entropy)

on compacted 2-D rows (masked tokens already removed). ``hard`` (``tile_math.HardLabels``)
adds each labelled row's cross-entropy with its coefficient to the value (``cross_entropy`` is
0 for rows without a label, and everywhere without ``hard``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .chunked import ChunkedDivergence, Tuning
from .tile_math import HardLabels, TorchTileMath

BACKEND_NAMES = ("auto", "torch", "cpu", "triton", "reference")

Runner = Callable[..., tuple[torch.Tensor, ...]]


def _torch_run(hs, ws, bs, ht, wt, bt, row_weights, opts, tuning: Tuning, scalar: bool, hard: HardLabels | None = None):
    return ChunkedDivergence.apply(hs, ws, bs, ht, wt, bt, row_weights, opts, TorchTileMath(), tuning, scalar, hard)


def _cpu_availability(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the native CPU kernel runs on CPU tensors only, got tensors on {device}"
    try:
        from . import cpu_native
    except ImportError as exc:  # the native backend has not been built into this package
        return False, f"the native CPU backend is not part of this install ({exc})"
    return cpu_native.availability()


def _triton_availability(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"Triton kernels need CUDA tensors, got tensors on {device}"
    try:
        from . import triton_backend
    except ImportError as exc:
        return False, f"the Triton backend cannot be imported ({exc})"
    return triton_backend.availability()


def availability(name: str, device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for backend ``name`` on ``device``; the reason explains a refusal."""
    if name in ("torch", "reference"):
        return True, ""
    if name == "cpu":
        return _cpu_availability(device)
    if name == "triton":
        return _triton_availability(device)
    raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` on ``device`` ("auto" picks the fastest usable one)."""
    if name == "auto":
        preferred = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}.get(device.type, ("torch",))
        return next(b for b in preferred if availability(b, device)[0])
    ok, reason = availability(name, device)
    if not ok:
        raise RuntimeError(f"backend={name!r} is unavailable: {reason}")
    return name


def runner(name: str) -> Runner:
    """The ``run`` callable of a concrete (resolved, non-reference) backend."""
    if name == "torch":
        return _torch_run
    if name == "cpu":
        from .cpu_native import run
        return run
    if name == "triton":
        from .triton_backend import run
        return run
    raise ValueError(f"no runner for backend {name!r}")


__all__ = ["BACKEND_NAMES", "Tuning", "availability", "resolve", "runner"]
