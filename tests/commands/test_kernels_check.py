"""``opd-fast kernels check``: the compile-only proof of the Triton kernels (no GPU needed).

The check compiles real sm_80 / sm_90a code with triton's bundled ``ptxas`` and ``cuobjdump``;
where those tools (or triton) are missing the compiling tests skip and say why. Compiling is
slow on a small CPU, so the default run compiles the gradient kernels (the paths that must stay
free of fp32 atomics); every kernel's default config is the ``slow`` test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_fast.commands.kernels import VARIANTS, KernelReport, fp32_atomics


def _missing_tools() -> str | None:
    try:
        import triton
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [name for name in ("ptxas-blackwell", "cuobjdump") if not (bin_dir / name).is_file()]
    return f"triton's CUDA tools are missing here: {', '.join(missing)} (in {bin_dir})" if missing else None


def _check(*options: str) -> list[dict]:
    """Run the CLI outside the interpreter (it compiles real GPU code) and return its JSON reports."""
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "opd_fast.cli", "kernels", "check", "--json", *options],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.stdout, out.stderr[-3000:]
    reports = json.loads(out.stdout)
    assert out.returncode == (0 if all(r["ok"] for r in reports) else 1), out.stderr[-2000:]
    return reports


def _assert_fast_code(reports: list[dict]) -> None:
    for r in reports:
        assert r["fp32_atomics"] == 0, r
        assert r["spill_stores"] == 0, r
        assert r["shared_bytes"] <= r["shared_limit"], r
        assert r["tensor_core_count"] > 0 or not r["tensor_cores_expected"], r
        assert r["ok"], r


@pytest.mark.parametrize(
    ("ptx", "count"),
    [
        ("red.global.add.f32 [%rd1], %f1;", 1),
        ("red.relaxed.gpu.global.add.v4.f32 [%rd1], {%f1, %f2, %f3, %f4};", 1),
        ("atom.global.gpu.acq_rel.add.f32 %f2, [%rd3], %f1;", 1),
        ("red.global.add.u32 [%rd1], 1;\nst.global.v4.b32 [%rd2], {%r1, %r2, %r3, %r4};", 0),
        ("red.shared.add.f32 [%r1], %f1;", 0),
    ],
)
def test_fp32_atomics_are_counted_in_ptx(ptx, count):
    assert fp32_atomics(ptx) == count


def test_a_report_with_an_atomic_is_not_ok():
    fields = dict(kernel="grad[jsd]", config="64x64x64 w8 s2", dtype="bfloat16", arch="sm_90a", registers=200,
                  spill_stores=0, spill_loads=0, shared_bytes=1024, shared_limit=232448, tensor_core_op="HGMMA",
                  tensor_core_count=8)
    assert KernelReport(**fields, fp32_atomics=0).ok
    assert not KernelReport(**fields, fp32_atomics=2).ok
    no_mma = {**fields, "tensor_core_count": 0}
    assert not KernelReport(**no_mma, fp32_atomics=0).ok
    assert KernelReport(**no_mma, fp32_atomics=0, tensor_cores_expected=False).ok  # a row kernel has no GEMM


def test_gradient_kernels_compile_without_atomics_or_spills():
    """The heaviest variant of both gradient kernels (two-head, single-head), default config, bf16, sm_80 / sm_90a."""
    variants = ("grad[jsd+labels]", "tail_grad[entropy]")
    reports = _check("--default-only", "--dtype", "bfloat16", *(f"--kernel={v}" for v in variants))
    assert sorted((r["kernel"], r["arch"]) for r in reports) == sorted(
        (v, a) for v in variants for a in ("sm_80", "sm_90a"))
    _assert_fast_code(reports)


@pytest.mark.slow
def test_every_kernel_default_config_compiles_fast_code():
    """Every kernel variant x dtype x arch, default config: spill-free, in shared memory, on tensor cores."""
    reports = _check("--default-only")
    import torch

    from opd_fast.backends.triton import configs_for

    dtypes = ("float32", "float16", "bfloat16")
    expected = {(f"{k}[{v}]", a, d) for k, v in VARIANTS for a in ("sm_80", "sm_90a") for d in dtypes
                if configs_for(k, int(a[3:5]), getattr(torch, d))}  # the cache GEMM has no fp32 config
    assert {(r["kernel"], r["arch"], r["dtype"]) for r in reports} == expected
    _assert_fast_code(reports)
