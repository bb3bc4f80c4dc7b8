"""The native CPU backend: against the float64 reference and the torch backend, ISA variants,
thread-count determinism, -inf / extreme logits, hard labels, the unavailable-library path, and ctest."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import opd_fast
from opd_fast import Tuning
from opd_fast.backends import chunked, cpu_native
from opd_fast.backends.tile_math import HardLabels, TorchTileMath
from opd_fast.core.call import HeadSpec, LossOptions
from opd_fast.core.dispatch import resolve
from opd_fast.core.tokens import NO_LABEL

AVAILABLE, WHY = cpu_native.availability()
needs_lib = pytest.mark.skipif(not AVAILABLE, reason=f"native library not built: {WHY}")
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)]
REPO = Path(__file__).resolve().parents[2]


def make_case(n=13, h_s=8, h_t=11, v=67, dtype=torch.float32, seed=0, scale=1.0, bias=True):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    case = dict(student_hidden=t(n, h_s).requires_grad_(), student_weight=t(v, h_s).requires_grad_(),
                teacher_hidden=t(n, h_t), teacher_weight=t(v, h_t))
    if bias:
        case.update(student_bias=t(v).requires_grad_(), teacher_bias=t(v))
    return case


def run(case, backend, **kw):
    """(loss, stats, grads) of sum(loss * fixed random upstream), all in float64."""
    grad_names = [k for k in ("student_hidden", "student_weight", "student_bias") if k in case]
    for name in grad_names:
        case[name].grad = None
    loss, stats = opd_fast.fused_linear_kl(**case, backend=backend, return_stats=True, **kw)
    gen = torch.Generator().manual_seed(5)
    upstream = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss.dtype)
    (loss * upstream).sum().backward()
    grads = [case[k].grad.double().clone() for k in grad_names]
    return loss.double().detach(), {k: v.double() for k, v in stats.items()}, grads


def assert_close(got, want, rtol, atol):
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=rtol, atol=atol, msg=k)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, float(b.abs().max())))


def reference_of(case, **kw):
    """The float64 reference on the same (possibly bf16-rounded) inputs."""
    as64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in case.items()}
    return run(as64, "reference", **kw)


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_agrees_with_torch_backend(dtype, divergence, beta):
    case = make_case(n=40, h_s=16, h_t=24, v=1001, dtype=dtype, seed=11)
    kw = dict(divergence=divergence, beta=beta, temperature=1.2, student_softcap=20.0, num_items=50)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    assert_close(run(case, "cpu", **kw), run(case, "torch", **kw), **tol)


@needs_lib
def test_bf16_chunked_and_sliced_grad_weight_matches_one_chunk(monkeypatch):
    """Several token chunks and grad-weight slices (the reused bf16 slice buffer) change nothing."""
    case = make_case(n=40, h_s=16, h_t=24, v=1001, dtype=torch.bfloat16, seed=12)
    whole = run(case, "cpu", divergence="reverse_kl")
    monkeypatch.setattr(chunked, "_GRAD_W_SLICE_ELEMS", 16 * 100)  # 100-row slices, the last one partial
    assert_close(run(case, "cpu", divergence="reverse_kl", tuning=Tuning(chunk_tokens=16)), whole,
                 rtol=1e-2, atol=1e-3)


@needs_lib
@pytest.mark.parametrize("endpoint,same_as", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints_are_exactly_kl(endpoint, same_as):
    case = make_case(seed=4)
    got = run(case, "cpu", divergence="jsd", beta=endpoint)
    want = run(case, "cpu", divergence=same_as)
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[2], want[2], strict=True))


def _tile_inputs(dtype, n=9, k=1003, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 4).to(dtype), (torch.randn(n, k, generator=g) * 4).to(dtype)


def _options(divergence="jsd", beta=0.3, temperature=1.3, softcap=7.0, k=1003):
    return LossOptions(divergence, beta, temperature, False, "mean", None, HeadSpec(softcap=softcap),
                       HeadSpec(softcap=None), k)


def _full_rows(math, raw_s, raw_t, opts):
    terms, lse_s, lse_t, grad = math.full_rows(raw_s.clone(), raw_t.clone(), opts, torch.linspace(0.5, 1.5, 9))
    return [*(t for t in terms if t is not None), lse_s, lse_t, grad.float()]


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_one_and_two_are_bitwise_identical(dtype):
    raw_s, raw_t = _tile_inputs(dtype)
    for div, beta in DIVERGENCES:
        opts = _options(div, beta)
        one = _full_rows(cpu_native.NativeTileMath(threads=1), raw_s, raw_t, opts)
        two = _full_rows(cpu_native.NativeTileMath(threads=2), raw_s, raw_t, opts)
        assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True)), div


@needs_lib
def test_isa_variants_agree_with_torch_tile_math():
    raw_s, raw_t = _tile_inputs(torch.float32, seed=1)
    for div, beta in DIVERGENCES:
        opts = _options(div, beta)
        want = _full_rows(TorchTileMath(), raw_s, raw_t, opts)
        for isa in ("generic", "avx2", "avx512"):
            if cpu_native.isa_supported(isa):
                for a, b in zip(_full_rows(cpu_native.NativeTileMath(isa=isa), raw_s, raw_t, opts), want, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{div} {isa}")


@needs_lib
def test_one_sided_neg_inf_matches_torch_backend():
    """Student-only zero mass: forward KL is infinite there, the others stay finite; no NaN anywhere."""
    raw_s, raw_t = _tile_inputs(torch.float32, n=9, k=50, seed=2)
    raw_s[:, 3] = float("-inf")
    raw_t[:, 7] = float("-inf")
    for div, beta in DIVERGENCES:
        opts = _options(div, beta, softcap=None, k=50)
        got = _full_rows(cpu_native.NativeTileMath(), raw_s, raw_t, opts)
        want = _full_rows(TorchTileMath(), raw_s, raw_t, opts)
        for a, b in zip(got[:5], want[:5], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=div)
        assert not any(t.isnan().any() for t in got[:5]), div


def test_missing_library_gives_clear_error(monkeypatch):
    monkeypatch.setattr(cpu_native, "_load", lambda: (None, "the native library was not built (test)"))
    with pytest.raises(RuntimeError, match="backend='cpu' is unavailable: the native library was not built"):
        resolve("cpu", torch.device("cpu"))
    assert resolve("auto", torch.device("cpu")) == "torch"


@needs_lib
def test_auto_prefers_native_on_cpu():
    assert resolve("auto", torch.device("cpu")) == "cpu"


# ---- hard labels: the cross-entropy in the same native sweep ---------------------------------------


def _hard(n=9, k=1003, seed=3):
    """Labels with two unlabelled rows (scale 0 there, as compaction gives) and per-row scales."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    labels[[2, 5]] = NO_LABEL
    labels[0] = k - 1  # the last column (the kernel's tail vector)
    return HardLabels(labels, torch.where(labels >= 0, torch.rand(n, generator=g) + 0.2, 0.0))


def _hard_rows(math, raw_s, raw_t, opts, hard, with_grad=True):
    scale = torch.linspace(0.5, 1.5, raw_s.shape[0])
    hard = hard if with_grad else hard._replace(scale=None)
    terms, lse_s, lse_t, grad = math.full_rows(raw_s.clone(), raw_t.clone(), opts, scale if with_grad else None, hard)
    return [*terms, lse_s, lse_t] + ([grad.float()] if with_grad else [])


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (1.0, 7.0), (1.6, None), (0.7, 7.0)])
def test_hard_labels_tile_matches_torch_tile_math(dtype, temperature, softcap):
    raw_s, raw_t = _tile_inputs(dtype)
    hard = _hard()
    for div, beta in DIVERGENCES:
        opts = _options(div, beta, temperature=temperature, softcap=softcap)
        for with_grad in (True, False):
            got = _hard_rows(cpu_native.NativeTileMath(), raw_s, raw_t, opts, hard, with_grad)
            want = _hard_rows(TorchTileMath(), raw_s.float(), raw_t.float(), opts, hard, with_grad)
            assert len(got) == len(want) == (7 if with_grad else 6)
            ce = got[3]
            assert bool((ce[hard.labels < 0] == 0).all()) and bool((ce[hard.labels >= 0] > 0).all())
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
            for name, a, b in zip(("div", "coef", "entropy", "ce", "lse_s", "lse_t", "grad"), got, want, strict=False):
                torch.testing.assert_close(a, b, **tol, msg=f"{div} {name}")


@needs_lib
def test_hard_labels_tile_with_neg_inf_logits_and_all_isas():
    raw_s, raw_t = _tile_inputs(torch.float32, n=9, k=50, seed=4)
    hard = _hard(k=49)  # labels < 49, so label + 1 below stays in range
    raw_s[:, ::7] = raw_t[:, ::7] = float("-inf")  # masked vocabulary, never a label here
    hard = hard._replace(labels=torch.where(hard.labels % 7 == 0, hard.labels + 1, hard.labels))
    for temperature in (1.0, 1.4):
        opts = _options("reverse_kl", 0.5, temperature=temperature, softcap=None, k=50)
        want = _hard_rows(TorchTileMath(), raw_s, raw_t, opts, hard)
        for isa in ("generic", "avx2", "avx512"):
            if cpu_native.isa_supported(isa):
                got = _hard_rows(cpu_native.NativeTileMath(isa=isa), raw_s, raw_t, opts, hard)
                assert all(bool(torch.isfinite(t).all()) for t in got), isa
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{isa} T={temperature}")


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hard_labels_threads_one_and_two_are_bitwise_identical(dtype):
    raw_s, raw_t = _tile_inputs(dtype)
    for temperature in (1.0, 1.3):
        opts = _options("jsd", 0.3, temperature=temperature)
        one = _hard_rows(cpu_native.NativeTileMath(threads=1), raw_s, raw_t, opts, _hard())
        two = _hard_rows(cpu_native.NativeTileMath(threads=2), raw_s, raw_t, opts, _hard())
        assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def _labels(n, v, seed, ignore=-100):
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    labels[::4] = ignore
    labels[1] = v - 1
    return labels


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_hard_labels_agree_with_torch_backend_over_chunks(dtype, temperature):
    case = make_case(n=40, h_s=16, h_t=24, v=1001, dtype=dtype, seed=13)
    kw = dict(divergence="tvd", temperature=temperature, labels=_labels(40, 1001, 7), hard_weight=0.4,
              tuning=Tuning(chunk_tokens=16))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    assert_close(run(case, "cpu", **kw), run(case, "torch", **kw), **tol)


def _have_toolchain() -> bool:
    return shutil.which("cmake") is not None and any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not _have_toolchain(), reason="cmake or a C++ compiler is not installed")
def test_ctest_passes(tmp_path):
    """Configure, build and run the C++ test of kernels/ (CI runs only pytest)."""
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build)],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
