"""``opd-fast kernels check``: compile every Triton kernel for real NVIDIA targets, no GPU needed.

For each kernel x launch config x dtype x architecture (sm_80, sm_90a) it compiles with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reports what
decides whether the kernel can run fast: registers and spill stores (``ptxas-blackwell -v``
on the emitted PTX: triton 3.9 emits PTX 9.x, which only that ptxas accepts), shared memory
against the architecture's per-block limit, and whether the SASS (``cuobjdump -sass``) uses
tensor cores (``HMMA`` on sm_80, ``HGMMA`` i.e. wgmma on sm_90a), and that no kernel issues fp32
atomics (``red``/``atom`` ``.global.add.f32`` in the PTX): the gradient kernels write logit-gradient
stripes and leave the grad GEMMs to cuBLAS, and an atomic creeping back in is a regression the
check fails on. Kernels are compiled in
their heaviest specialization (JSD, biases, softcaps, gradient filtering, odd-free shapes of
Liger's benchmark) so the register figures bound every other variant's.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = (80, 90)
DTYPES = ("float32", "float16", "bfloat16")
# Max shared memory per block (opt-in): A100 164 KB, H100 227 KB.
SMEM_LIMIT = {80: 166912, 90: 232448}
TENSOR_CORE_OP = {80: "HMMA", 90: "HGMMA"}
# (kernel, divergence) specializations compiled: the heaviest one per code path. The terms
# kernel has two (after pass 1 for JSD/TVD; one-pass online KL). The single-head kernels have
# no divergence: their heaviest variant is the log-probs' with entropy (tail mean; gradient slope).
# The cached mode's row kernel (no GEMM: no tensor cores expected) runs on 2048-token logit chunks, streaming
# the student at T != 1 with labels ("jsd+labels") or taking both LSEs from tile statistics ("+t1"); its cache
# GEMM is compiled for the teacher's head (the wider hidden size) with bias and softcap ("teacher").
# "+labels": with hard labels at T != 1 (label gather plus the log-sum-exp of T z), in the
# passes that carry them: pass 1 (JSD/TVD), the one-pass KL, the gradient; "+t1" at T = 1,
# where the gradient takes its own code path (the CE's softmax folded into a - q c).
VARIANTS = (
    ("lse", "jsd"), ("terms", "jsd"), ("terms", "forward_kl"), ("grad", "jsd"),
    ("lse", "jsd+labels"), ("terms", "forward_kl+labels"), ("grad", "jsd+labels"), ("grad", "jsd+labels+t1"),
    ("tail_lse", "entropy"), ("tail_grad", "entropy"), ("cached_rows", "jsd+labels"), ("cached_rows", "jsd+labels+t1"),
    ("cached_logits", "teacher"),
)
# Ids per row of the single-head kernels (a served teacher's top-k).
TOPK = 20
# Token chunk of the cached mode (a 1 GB budget's choice at Liger's vocabulary: 4 bytes per logit).
CACHED_CHUNK_TOKENS = 2048
# Liger's published benchmark shape (docs/performance.md).
SHAPE = {"n": 8192, "hs": 2048, "ht": 4096, "vocab": 128256}


@dataclass
class KernelReport:
    kernel: str
    config: str
    dtype: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    shared_limit: int
    tensor_core_op: str
    tensor_core_count: int
    fp32_atomics: int
    tensor_cores_expected: bool = True  # False for a kernel without a GEMM

    @property
    def ok(self) -> bool:
        return (self.spill_stores == 0 and self.shared_bytes <= self.shared_limit and self.fp32_atomics == 0
                and (self.tensor_core_count > 0 or not self.tensor_cores_expected))


# An fp32 atomic add to global memory in PTX: ``red.global.add.f32``, ``atom.global.add.f32`` and their
# scoped / vector forms (``red.relaxed.gpu.global.add.v4.f32``).
_FP32_ATOMIC = re.compile(r"\b(?:red|atom)(?:\.\w+)*\.global(?:\.\w+)*\.add(?:\.\w+)*\.f32\b")


def fp32_atomics(ptx: str) -> int:
    """Number of fp32 global atomic adds in ``ptx``."""
    return len(_FP32_ATOMIC.findall(ptx))


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _kernel_arguments(kernel: str, divergence: str, dtype):
    """Launcher keyword arguments on meta tensors (shapes only): what a real launch would pass."""
    import torch

    from ..backends.chunked import Head
    from ..backends.rows import RowSetup
    from ..backends.tile_math import HardLabels
    from ..backends.triton.cached import cached_rows_arguments
    from ..backends.triton.cached_logits import GPU_CONFIGS, ShiftedLogits, cache_dtype, cached_logits_arguments
    from ..backends.triton.grad import grad_arguments
    from ..backends.triton.lse import lse_arguments
    from ..backends.triton.tail_grad import tail_grad_arguments
    from ..backends.triton.tail_lse import tail_lse_arguments
    from ..backends.triton.terms import terms_arguments
    from ..core.call import HeadSpec, LossOptions, Tuning

    divergence, *extras = divergence.split("+")
    n, hs_dim, ht_dim, vocab = SHAPE["n"], SHAPE["hs"], SHAPE["ht"], SHAPE["vocab"]
    meta = {"dtype": dtype, "device": "meta"}
    hs, ws, bs = torch.empty(n, hs_dim, **meta), torch.empty(vocab, hs_dim, **meta), torch.empty(vocab, **meta)
    ht, wt, bt = torch.empty(n, ht_dim, **meta), torch.empty(vocab, ht_dim, **meta), torch.empty(vocab, **meta)
    opts = LossOptions(
        divergence=divergence, beta=0.5, temperature=1.0 if "t1" in extras else 2.0, temperature_sq_scaling=False,
        reduction="mean", num_items=None, student=HeadSpec(1.0, 30.0), teacher=HeadSpec(1.0, 30.0), vocab_size=vocab,
    )
    rows = torch.empty(n, dtype=torch.float32, device="meta")
    labels = torch.empty(n, dtype=torch.int64, device="meta") if "labels" in extras else None
    if kernel.startswith("cached_"):
        chunk, tile_n = CACHED_CHUNK_TOKENS, GPU_CONFIGS[90].block_n
        stats = torch.empty(2, chunk, -(-vocab // tile_n), dtype=torch.float32, device="meta")
        values = torch.empty(chunk, vocab, dtype=cache_dtype(dtype), device="meta")
        if kernel == "cached_logits":
            return cached_logits_arguments(ht[:chunk], Head(wt, bt, 1.0), opts.teacher, opts.temperature, vocab,
                                           values, stats)
        rows_c = torch.empty(chunk, dtype=torch.float32, device="meta")
        hard = HardLabels(torch.empty(chunk, dtype=torch.int64, device="meta"), rows_c)
        grad = torch.empty(chunk, vocab, **meta)  # the gradient in the student's dtype, over its cache
        if values.dtype == torch.float32:  # fp32 inputs: the torch GEMM's fp32 logits
            return cached_rows_arguments(values, values, opts, rows_c, hard, grad)
        cache = ShiftedLogits(values, stats, tile_n)
        return cached_rows_arguments(cache, cache, opts, rows_c, hard, grad)
    if kernel.startswith("tail_"):
        ids = torch.empty(n, TOPK, dtype=torch.int32, device="meta")
        setup = RowSetup(opts.student, opts.temperature, vocab, Tuning(grad_filter_eps=1e-6))
        if kernel == "tail_lse":
            return tail_lse_arguments(hs, ws, bs, ids, setup, True, 1)
        return tail_grad_arguments(hs, ws, bs, ids, rows, rows, rows, setup, _stripe_buffer(n, ws), 1)
    if kernel == "lse":
        return lse_arguments(hs, ws, bs, ht, wt, bt, opts, 1, labels)
    if kernel == "terms":
        lse = (None, None) if divergence.endswith("_kl") else (rows, rows)
        return terms_arguments(hs, ws, bs, ht, wt, bt, *lse, opts, 1, labels)
    hard = None if labels is None else HardLabels(labels, rows)
    return grad_arguments(hs, ws, bs, ht, wt, bt, rows, rows, rows, rows, opts, _stripe_buffer(n, ws), 1, 1e-6, hard,
                          rows)


def _stripe_buffer(n: int, ws):
    """A gradient kernel's output: one default-budget stripe of the logit gradient (meta tensor)."""
    import torch

    from ..backends.triton.stripes import stripe_width
    from ..core.call import Tuning

    width = stripe_width(Tuning(), n, ws.shape[0], ws.dtype, 128)
    return torch.empty(n, width, dtype=ws.dtype, device="meta")


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas-blackwell -v``."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [_tool("ptxas-blackwell"), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _tensor_core_count(cubin: bytes, op: str) -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return len(re.findall(rf"\b{op}\b", sass))


def check_kernels(
    variants: tuple[tuple[str, str], ...] = VARIANTS,
    archs: tuple[int, ...] = ARCHS,
    dtypes: tuple[str, ...] = DTYPES,
    default_only: bool = False,
) -> list[KernelReport]:
    """Compile and inspect every (kernel variant, config, dtype, arch); ``default_only``: first config."""
    import torch

    from ..backends.triton import KERNELS, NO_MMA, configs_for
    from ..backends.triton.common import INTERPRET, compile_for_target

    if INTERPRET:
        raise RuntimeError("kernels check compiles real GPU code: unset TRITON_INTERPRET (it swaps in the interpreter)")

    reports = []
    for name, divergence in variants:
        for arch in archs:
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                configs = configs_for(name, arch, dtype)
                for config in configs[:1] if default_only else configs:
                    args = _kernel_arguments(name, divergence, dtype)
                    compiled = compile_for_target(KERNELS[name], args, config, arch)
                    regs, spill_st, spill_ld = _ptxas_stats(compiled.asm["ptx"], arch)
                    op = TENSOR_CORE_OP[arch]
                    reports.append(KernelReport(
                        kernel=f"{name}[{divergence}]", config=config.label(), dtype=dtype_name,
                        arch="sm_90a" if arch == 90 else f"sm_{arch}", registers=regs, spill_stores=spill_st,
                        spill_loads=spill_ld, shared_bytes=compiled.metadata.shared, shared_limit=SMEM_LIMIT[arch],
                        tensor_core_op=op, tensor_core_count=_tensor_core_count(compiled.asm["cubin"], op),
                        fp32_atomics=fp32_atomics(compiled.asm["ptx"]), tensor_cores_expected=name not in NO_MMA,
                    ))
    return reports


def format_table(reports: list[KernelReport]) -> str:
    head = ("kernel", "config", "dtype", "arch", "regs", "spill st", "smem KB", "tensor cores", "fp32 atomics", "ok")
    rows = [
        (r.kernel, r.config, r.dtype, r.arch, str(r.registers), str(r.spill_stores),
         f"{r.shared_bytes / 1024:.0f}/{r.shared_limit / 1024:.0f}", f"{r.tensor_core_op} x{r.tensor_core_count}",
         str(r.fp32_atomics), "yes" if r.ok else "NO")
        for r in reports
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def _run(args: argparse.Namespace) -> int:
    chosen = set(args.kernel or ())
    variants = tuple(v for v in VARIANTS if not chosen or v[0] in chosen or f"{v[0]}[{v[1]}]" in chosen)
    reports = check_kernels(variants, dtypes=tuple(args.dtype or DTYPES), default_only=args.default_only)
    if args.json:
        print(json.dumps([{**asdict(r), "ok": r.ok} for r in reports], indent=2))
    else:
        print(format_table(reports))
    return 0 if all(r.ok for r in reports) else 1


def register(sub: argparse._SubParsersAction) -> None:
    kernels = sub.add_parser("kernels", help="inspect the Triton kernels (compile for sm_80 / sm_90a, no GPU needed)")
    action = kernels.add_subparsers(dest="kernels_command", required=True)
    check = action.add_parser("check", help="compile every kernel x config x dtype; report regs, spills, smem, MMA")
    check.add_argument("--json", action="store_true", help="print the reports as JSON")
    check.add_argument("--default-only", action="store_true", help="only the default (first) config per arch")
    names = sorted({k for k, _ in VARIANTS} | {f"{k}[{v}]" for k, v in VARIANTS})
    check.add_argument("--kernel", action="append", choices=names, metavar="KERNEL",
                       help="check only this kernel (all its variants) or variant, e.g. 'grad[jsd+labels]' "
                            "(repeatable; default: all)")
    check.add_argument("--dtype", action="append", choices=DTYPES, help="check only this dtype (repeatable)")
    check.set_defaults(func=_run)
