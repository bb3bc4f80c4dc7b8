"""Native row kernels (backend="cpu") of fused_linear_kl_topk and fused_linear_logprobs: values,
stats and gradients against the float64 reference, the torch row kernels per tile, ISA variants
and thread-count determinism."""

import pytest
import torch

import opd_fast
from opd_fast import Tuning
from opd_fast.backends import cpu_native
from opd_fast.backends.cpu_rows import NativeLogProbRows, NativeTopKRows
from opd_fast.backends.row_math import LogProbRows, TopKCategories, TopKRows
from opd_fast.core.call import HeadSpec, LossOptions

AVAILABLE, WHY = cpu_native.availability()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"native library not built: {WHY}")
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)]
# bf16: the GEMMs round too (the torch backend is off from the float64 reference by as much)
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=5e-2, atol=5e-3)}
SMALL = Tuning(chunk_tokens=4)  # several chunks


def _student(n=13, h=8, v=67, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    hidden, weight = t(n, h).requires_grad_(), (0.8 * t(v, h)).requires_grad_()
    return hidden, weight, t(v).requires_grad_() if bias else None


def _teacher(n=13, v=67, k=5, seed=1, pad=True):
    """Top-k of a random teacher (fp32 log-probs), with padding slots and one all-padding row."""
    g = torch.Generator().manual_seed(seed)
    log_p, ids = torch.log_softmax(2.0 * torch.randn(n, v, generator=g), -1).topk(k, -1)
    if pad and k > 2:
        ids[0, 2:], log_p[0, 2:] = -1, 0.0
        ids[3, 1], log_p[3, 1] = -1, float("nan")
        ids[4], log_p[4] = -1, -3.0
    return ids, log_p


def _as64(student):
    return tuple(None if t is None else t.detach().double().requires_grad_() for t in student)


def _run(fn, student, **kw):
    """(outputs, grads) of sum(out_i * fixed random upstream_i) over the differentiable outputs."""
    out = fn(*student, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
    gen = torch.Generator().manual_seed(5)
    total = sum((o * (torch.rand(o.shape, generator=gen, dtype=torch.float64) + 0.5).to(o.dtype)).sum() for o in diff)
    grads = torch.autograd.grad(total, [t for t in student if t is not None])
    return outs, [g.double() for g in grads]


def _topk(backend):
    def fn(hidden, weight, bias, *, ids, log_p, **kw):
        return opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, student_bias=bias, backend=backend, **kw)

    return fn


def _assert_close(got, want, tol):
    (outs, grads), (want_outs, want_grads) = got, want
    for a, b in zip(outs, want_outs, strict=True):
        if isinstance(b, dict):
            assert set(a) == set(b)
            for name in b:
                torch.testing.assert_close(a[name].double(), b[name].double(), **tol, msg=name)
        else:
            torch.testing.assert_close(a.double(), b.double(), **tol)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("k", [1, 67])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_topk_k_one_and_k_vocab(k, tail, divergence, beta):
    """k = 1 (renormalize: one category, divergence 0) and k = V (the bucket has no tail)."""
    student = _student(seed=k)
    ids, log_p = _teacher(k=k, pad=False)
    kw = dict(ids=ids, log_p=log_p, divergence=divergence, beta=beta, tail=tail, return_stats=True)
    _assert_close(_run(_topk("cpu"), student, **kw), _run(_topk("reference"), _as64(student), **kw),
                  TOL[torch.float32])


def test_topk_vocab_size_and_dominant_ids():
    """A padded head (vocab_size < V) and ids holding all but e^-60 of the student's mass."""
    hidden, weight, bias = _student(v=70, seed=9)
    ids, log_p = _teacher(v=64, seed=10)
    with torch.no_grad():
        bias[ids[5].clamp_min(0)] += 60.0
    kw = dict(ids=ids, log_p=log_p, divergence="reverse_kl", vocab_size=64, return_stats=True)
    student = (hidden, weight, bias)
    _assert_close(_run(_topk("cpu"), student, **kw), _run(_topk("reference"), _as64(student), **kw),
                  dict(rtol=2e-4, atol=1e-4))


def _logprobs(backend):
    def fn(hidden, weight, bias, *, ids, **kw):
        return opd_fast.fused_linear_logprobs(hidden, weight, ids, bias=bias, backend=backend, **kw)

    return fn


def test_logprobs_gradient_of_the_entropy_alone():
    student, ids = _student(seed=4), torch.randint(0, 67, (13,), generator=torch.Generator().manual_seed(5))
    as64 = _as64(student)
    got = _logprobs("cpu")(*student, ids=ids, return_entropy=True)[1]
    want = _logprobs("reference")(*as64, ids=ids, return_entropy=True)[1]
    torch.testing.assert_close(got.double(), want.detach(), **TOL[torch.float32])
    for a, b in zip(torch.autograd.grad(got.sum(), student), torch.autograd.grad(want.sum(), as64), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5 * max(1.0, float(b.abs().max())))


# ---- tile level: the native kernels against the torch row kernels they replace ---------------------


def _raw(dtype, n=9, v=300, seed=0):
    return (torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


def _topk_rows(tail, divergence="jsd", beta=0.3, temperature=1.3, softcap=6.0, n=9, v=300, k=7, **native):
    ids, log_p = _teacher(n=n, v=v, k=k, seed=2)
    opts = LossOptions(divergence, beta, temperature, False, "mean", None, HeadSpec(softcap=softcap),
                       HeadSpec(softcap=None), v)
    return NativeTopKRows(TopKRows(TopKCategories(ids, log_p, opts, tail), entropy=True), opts, **native)


def _logprob_rows(temperature=1.3, softcap=6.0, n=9, v=300, **native):
    ids = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    return NativeLogProbRows(LogProbRows(ids, entropy=True), HeadSpec(softcap=softcap), temperature, **native)


def _call(kernel, raw, upstream, native=True):
    """Outputs and the raw-logit gradient of one tile (the torch path on fp32 when not ``native``)."""
    rows = slice(0, raw.shape[0])
    values, grad = kernel(raw.clone(), rows, upstream) if native else kernel._torch(raw.float().clone(), rows, upstream)
    return [*values, grad.float()]


def _upstream(kernel, n=9):
    gen = torch.Generator().manual_seed(6)
    return [torch.rand(n, generator=gen) - 0.3 for _ in range(kernel.n_differentiable)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [lambda **kw: _topk_rows("bucket", **kw), lambda **kw: _topk_rows("renormalize", **kw),
                                  _logprob_rows], ids=["bucket", "renormalize", "logprobs"])
def test_tile_matches_torch_kernel_on_every_isa_and_thread_count(dtype, make):
    raw = _raw(dtype)
    want = _call(make(), raw, _upstream(make()), native=False)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    for isa in ("generic", "avx2", "avx512"):
        if not cpu_native.isa_supported(isa):
            continue
        one, two = (_call(k, raw, _upstream(k)) for k in (make(isa=isa, threads=t) for t in (1, 2)))
        assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True)), isa
        for a, b in zip(one, want, strict=True):
            torch.testing.assert_close(a, b, **tol, msg=isa)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_tile_neg_inf_logits(divergence, beta):
    """Masked vocabulary (-inf raw logits, never a top-k id) has zero mass and zero gradient."""
    raw = _raw(torch.float32, seed=4)
    for tail in ("bucket", "renormalize"):
        kernel = _topk_rows(tail, divergence, beta, softcap=None)
        ids = kernel.ids.clamp_min(0)
        masked = torch.ones_like(raw, dtype=torch.bool).scatter_(1, ids, False)
        masked[:, 1::2] = False
        raw_masked = raw.masked_fill(masked, float("-inf"))
        got = _call(kernel, raw_masked, _upstream(kernel))
        want = _call(kernel, raw_masked, _upstream(kernel), native=False)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=tail)
        assert bool((got[-1][masked] == 0).all()) and all(bool(torch.isfinite(t).all()) for t in got)


def test_no_gradient_leaves_the_tile_and_returns_none():
    for kernel in (_topk_rows("bucket"), _logprob_rows()):
        raw = _raw(torch.float32)
        values, grad = kernel(raw, slice(0, 9), None)
        assert grad is None and torch.equal(raw, _raw(torch.float32)) and len(values) == len(kernel.output_names)
