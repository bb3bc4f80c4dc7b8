"""The native CPU backend: ctypes binding of the C++ tile kernels built from ``kernels/``.

The chunk loop and GEMMs are ``chunked.py``'s (its ``ChunkedEngine``); only the element-wise
full-row tile math (``TileMath.full_rows``, hard labels included) runs natively, in one fused
kernel per chunk that writes the gradient over the student logits tile (fp32 or bf16) in
place. ``cpu_rows`` binds the single-head row kernels (log-probs, top-k) the same way.

The library is found through ``importlib.resources.files("opd_fast")``, which also works in
editable installs (the shared library is not beside the sources there). A missing library
leaves the package usable: ``availability()`` says why and ``core.dispatch`` refuses ``"cpu"``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
import sys

import torch

from ..core.call import LossOptions
from .tile_math import HardLabels, RowTerms, TorchTileMath

__all__ = ["ISA_NAMES", "NativeTileMath", "availability"]

ABI_VERSION = 2
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
DIVERGENCE_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
ISA_NAMES = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3}
_OK, _BAD_ARGUMENT, _ISA_UNAVAILABLE, _OUT_OF_MEMORY = 0, 1, 2, 3


class _Tile(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int32), ("ld", ctypes.c_int64)]


class _Options(ctypes.Structure):
    _fields_ = [
        ("divergence", ctypes.c_int32),
        ("beta", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("softcap_s", ctypes.c_float),
        ("softcap_t", ctypes.c_float),
    ]


class TopKOptions(ctypes.Structure):
    _fields_ = [
        ("divergence", ctypes.c_int32),
        ("beta", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("bucket", ctypes.c_int32),
    ]


def _library_names() -> tuple[str, ...]:
    if sys.platform == "win32":
        return ("opd_fast_cpu.dll",)
    if sys.platform == "darwin":
        return ("libopd_fast_cpu.dylib", "libopd_fast_cpu.so")
    return ("libopd_fast_cpu.so",)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not); cached: the answer cannot change within a process."""
    package = importlib.resources.files("opd_fast")
    candidates = [package / name for name in _library_names()]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return None, (
            f"the native library ({', '.join(_library_names())}) was not built into the opd_fast package; "
            "reinstall with a C++17 compiler and CMake >= 3.18 available (`pip install -e .`)"
        )
    try:
        lib = ctypes.CDLL(str(found))
    except OSError as exc:
        return None, f"the native library {found} failed to load: {exc}"
    lib.opd_abi_version.restype = ctypes.c_int
    if lib.opd_abi_version() != ABI_VERSION:
        return None, f"the native library {found} has ABI {lib.opd_abi_version()}, expected {ABI_VERSION}; reinstall"
    lib.opd_isa_supported.argtypes = [ctypes.c_int32]
    lib.opd_isa_name.restype = ctypes.c_char_p
    lib.opd_isa_name.argtypes = [ctypes.c_int32]
    ptr, i32, i64, f32, tile = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.POINTER(_Tile)
    grad = [ptr, i32, i64]  # data, dtype, ld
    signatures = {
        "opd_full_rows": [tile, tile, i64, i64, ctypes.POINTER(_Options), ptr, *grad, *[ptr] * 5, ptr, ptr, ptr],
        "opd_logprob_rows": [tile, i64, i64, f32, f32, ptr, ptr, ptr, *grad, ptr, ptr],
        "opd_topk_rows": [tile, i64, i64, ctypes.POINTER(TopKOptions), ptr, i64, i64, ptr, i64, ptr, *grad,
                          *[ptr] * 4],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [*args, i32, i32]  # n_threads, isa
    return lib, ""


def availability() -> tuple[bool, str]:
    """(usable, reason): whether the native library is built, loadable and ABI-compatible."""
    lib, reason = _load()
    return lib is not None, reason


def isa_supported(isa: str) -> bool:
    """Whether the instruction-set variant ``isa`` (see ``ISA_NAMES``) runs on this CPU."""
    return bool(library().opd_isa_supported(ISA_NAMES[isa]))


def library() -> ctypes.CDLL:
    """The loaded library, or RuntimeError saying why ``backend="cpu"`` cannot run."""
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(f"backend='cpu' is unavailable: {reason}")
    return lib


def tile(t: torch.Tensor) -> ctypes._Pointer[_Tile]:
    """A pointer to the C description of the row-major 2-D tile ``t``."""
    return ctypes.pointer(_Tile(t.data_ptr(), _DTYPES[t.dtype], t.stride(0)))


def grad_args(t: torch.Tensor) -> tuple[int, int, int]:
    """(data, dtype, ld) of a gradient tile written by the kernel."""
    return t.data_ptr(), _DTYPES[t.dtype], t.stride(0)


def address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def row_major(t: torch.Tensor) -> torch.Tensor:
    """A 2-D fp32/bf16 tile with unit column stride (other dtypes compute in fp32)."""
    if t.dtype not in _DTYPES:
        t = t.float()
    return t if t.stride(1) == 1 else t.contiguous()


def row_floats(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-row input as contiguous fp32 (None stays None)."""
    return None if t is None else t.to(torch.float32).contiguous()


def check(status: int, isa: str, what: str) -> None:
    """Raise RuntimeError for a non-OK status of a kernel call on ``what`` (e.g. the tiles' shapes)."""
    if status != _OK:
        why = {_ISA_UNAVAILABLE: f"isa={isa!r} is not supported by this CPU",
               _OUT_OF_MEMORY: "out of memory for the per-thread scratch rows"}.get(status, "bad arguments")
        raise RuntimeError(f"native kernel failed (status {status}): {why}; {what}")


class NativeOptions:
    """The ``isa`` and ``threads`` knobs shared by the native kernels (see ``NativeTileMath``)."""

    def __init__(self, isa: str = "auto", threads: int | None = None) -> None:
        if isa not in ISA_NAMES:
            raise ValueError(f"isa must be one of {tuple(ISA_NAMES)}, got {isa!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.isa, self.threads = isa, threads

    def call_args(self) -> tuple[int, int]:
        """(n_threads, isa) as the C functions take them."""
        return self.threads or torch.get_num_threads(), ISA_NAMES[self.isa]


class NativeTileMath(NativeOptions):
    """``TileMath`` whose full-row math runs in the native kernel (float64 stays in torch).

    ``isa`` forces an instruction-set variant ("auto" picks the best; tests compare them) and
    ``threads`` defaults to ``torch.get_num_threads()`` at each call.
    """

    def live_bytes_per_logit(self, dtype: torch.dtype) -> int:
        """Memory per (token, vocab) element of a chunk: the two raw tiles (the gradient reuses one)."""
        if dtype == torch.float64:
            return TorchTileMath().live_bytes_per_logit(dtype)
        return 2 * (2 if dtype == torch.bfloat16 else 4) + (8 if dtype not in _DTYPES else 0)

    def logits_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The GEMM's own dtype (the kernel reads bf16 and fp32 tiles as they are)."""
        return dtype

    def full_rows(
        self,
        raw_s: torch.Tensor,
        raw_t: torch.Tensor,
        opts: LossOptions,
        row_scale: torch.Tensor | None,
        hard: HardLabels | None = None,
        grad_dtype: torch.dtype | None = None,  # unused: the gradient comes back in fp32 or raw_s's dtype
    ) -> tuple[RowTerms, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``TileMath.full_rows``; the gradient overwrites ``raw_s`` (returned in its dtype).

        Hard labels cost nothing extra at temperature 1 and one exp per element otherwise.
        """
        if raw_s.dtype == torch.float64:
            return TorchTileMath().full_rows(raw_s, raw_t, opts, row_scale, hard)
        lib = library()
        raw_s, raw_t = row_major(raw_s), row_major(raw_t)
        n, k = raw_s.shape
        stats = torch.empty(6, n, dtype=torch.float32)
        options = _Options(
            DIVERGENCE_IDS[opts.divergence], opts.beta, opts.temperature,
            opts.student.softcap or 0.0, opts.teacher.softcap or 0.0,
        )
        scale = row_floats(row_scale)
        labels = None if hard is None else hard.labels.to(torch.int64).contiguous()
        hard_scale = None if hard is None or scale is None else row_floats(hard.scale)
        status = lib.opd_full_rows(
            tile(raw_s), tile(raw_t), n, k, ctypes.byref(options), address(scale), *grad_args(raw_s),
            *(s.data_ptr() for s in stats[:5]), address(labels), address(hard_scale), stats[5].data_ptr(),
            *self.call_args(),
        )
        check(status, self.isa, f"tiles {tuple(raw_s.shape)} {raw_s.dtype} / {tuple(raw_t.shape)} {raw_t.dtype}")
        divergence, coef, entropy, lse_s, lse_t, ce = stats
        terms = RowTerms(divergence, coef, entropy, None if hard is None else ce)
        return terms, lse_s, lse_t, None if scale is None else raw_s
