"""Which backend runs a call, and the engine it builds for it: the one dispatch of every loss.

``availability(name, device)`` says whether a backend can run here and, if not, why;
``resolve`` turns ``"auto"`` into the fastest usable one (Triton on CUDA, the native kernel on
CPU when it is built, else chunked torch); ``make_engine`` builds that backend's ``Engine`` for
the call's teacher signal from the compacted rows. Backend modules are imported lazily, so a
missing native library or Triton install only ever disables its own backend.
"""

from __future__ import annotations

import os

import torch

from .call import BACKEND_NAMES, Backend, LossCall, SampledTokens, TeacherHead, TopKTeacher
from .engine import Engine, Student, accum_dtype
from .tokens import TokenRows

__all__ = ["availability", "make_engine", "resolve"]


def _triton_interpreted() -> bool:
    """``TRITON_INTERPRET=1``: the Triton kernels run on CPU tensors in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cpu_availability(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the native CPU kernel runs on CPU tensors only, got tensors on {device}"
    try:
        from ..backends import cpu_native
    except ImportError as exc:  # the native backend has not been built into this package
        return False, f"the native CPU backend is not part of this install ({exc})"
    return cpu_native.availability()


def _triton_availability(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
        return False, (f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got tensors "
                       f"on {device}")
    try:
        from ..backends import triton_backend
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


def resolve(name: Backend, device: torch.device) -> Backend:
    """The concrete backend for ``name`` on ``device`` ("auto" picks the fastest usable one)."""
    if name == "auto":
        preferred = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}.get(device.type, ("torch",))
        return next(b for b in preferred if availability(b, device)[0])
    ok, reason = availability(name, device)
    if not ok:
        raise RuntimeError(f"backend={name!r} is unavailable: {reason}")
    return name


def make_engine(call: LossCall, name: Backend, tokens: TokenRows, labels: torch.Tensor | None = None) -> Engine:
    """Backend ``name``'s engine for ``call`` on its counted rows (``labels``: per-row hard labels)."""
    from ..backends.rows import RowsEngine, RowSetup

    opts, tuning, teacher = call.options, call.tuning, call.teacher
    if isinstance(teacher, TeacherHead):
        head = teacher.head
        rows = Student(tokens.take(head.hidden).contiguous(), head.weight.contiguous(),
                       None if head.bias is None else head.bias.contiguous())
        lse = None if teacher.lse is None else tokens.take(teacher.lse).contiguous()
        if name == "triton":
            from ..backends.triton_backend import two_head_engine

            return two_head_engine(rows, opts, tuning, labels, lse)
        from ..backends.chunked import ChunkedEngine

        if name == "cpu":
            from ..backends.cpu_native import NativeTileMath

            return ChunkedEngine(rows, opts, NativeTileMath(), tuning, labels, lse)
        from ..backends.tile_math import TorchTileMath

        return ChunkedEngine(rows, opts, TorchTileMath(), tuning, labels, lse)

    setup = RowSetup.of(opts, tuning)
    if isinstance(teacher, TopKTeacher):
        from ..backends.row_math import TopKCategories, TopKRows

        # the category math runs in the student's accumulation dtype, whatever the teacher's log-probs dtype
        log_p = tokens.take(teacher.logprobs).to(accum_dtype(call.student.hidden.dtype))
        categories = TopKCategories(tokens.take(teacher.ids).long(), log_p, opts, teacher.tail)
        if teacher.tail == "renormalize" and not call.return_stats:  # only the k id logits matter, on any backend
            from ..backends.gathered import GatheredEngine

            return GatheredEngine(categories, setup)
        if name == "triton":
            from ..backends.triton_rows import TopKMath, TritonRowsEngine

            return TritonRowsEngine(TopKMath(categories, call.return_stats), setup)
        kernel = TopKRows(categories, call.return_stats)
        if name == "cpu":
            from ..backends.cpu_rows import NativeTopKRows

            kernel = NativeTopKRows(kernel, opts)
        return RowsEngine(kernel, setup)

    assert isinstance(teacher, SampledTokens)
    token_ids = tokens.take(teacher.ids).long()
    if name == "triton":
        from ..backends.triton_rows import LogProbMath, TritonRowsEngine

        return TritonRowsEngine(LogProbMath(token_ids, call.return_stats), setup)
    from ..backends.row_math import LogProbRows

    kernel = LogProbRows(token_ids, call.return_stats)
    if name == "cpu":
        from ..backends.cpu_rows import NativeLogProbRows

        kernel = NativeLogProbRows(kernel, opts.student, opts.temperature)
    return RowsEngine(kernel, setup)
