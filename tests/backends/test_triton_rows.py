"""Triton backend of the single-head losses (``fused_linear_logprobs``, ``fused_linear_kl_topk``).

Interpreter numerics (``TRITON_INTERPRET=1``, CPU tensors, tiny odd shapes) against the float64
reference, through the public functions with ``backend="triton"`` (which the interpreter makes
available for CPU tensors). The compile check of ``tail_lse`` / ``tail_grad``
is ``test_triton.py::test_compile_check_default_configs``.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import opd_fast
from opd_fast import Tuning, reference
from opd_fast.backends import triton_rows
from opd_fast.backends.triton import configs_for

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter numerics run on CPU tensors with TRITON_INTERPRET=1",
)

N, H, V = 13, 24, 70  # odd rows (one partial row block), masked K-loop (24 % 16), 3 vocabulary tiles of 32
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float16: dict(rtol=3e-2, atol=3e-3)}
HEAD = dict(temperature=1.5, logit_scale=0.8, softcap=6.0)
TOPK_HEAD = {f"student_{k}" if k != "temperature" else k: v for k, v in HEAD.items()}
STATS = ("divergence", "student_lse", "student_entropy", "student_topk_mass", "teacher_topk_mass")


@pytest.fixture
def triton():
    """The public (logprobs, topk) functions (their ``backend="triton"`` runs in the interpreter)."""
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy inf - inf in masked lanes
    return opd_fast.fused_linear_logprobs, opd_fast.fused_linear_kl_topk


def student(dtype=torch.float32, n=N, v=V, bias=True, spread=1.0):
    g = lambda *shape, s=1.0: (torch.randn(*shape) * s).to(dtype).requires_grad_()
    return g(n, H, s=spread), g(v, H, s=0.5), g(v) if bias else None


def assert_grads(out, ref, leaves, dtype, upstream=None):
    """Gradients of ``sum(upstream * out)`` against the reference's, relative to the largest entry."""
    leaves = [t for t in leaves if t is not None]
    upstream = torch.randn(ref.shape, dtype=torch.float64) if upstream is None else upstream
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), leaves, retain_graph=True)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), leaves, retain_graph=True)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        scale = r.double().abs().max().clamp_min(1e-12)
        torch.testing.assert_close(g.double() / scale, r.double() / scale, **TOL[dtype])


# ---- fused_linear_logprobs ---------------------------------------------------------------------


def compare_logprobs(fn, hidden, weight, bias, ids, dtype=torch.float32, **kw):
    out = fn(hidden, weight, ids, bias=bias, backend="triton", return_entropy=True, **kw)
    ref = reference.fused_linear_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, **kw)
    for got, want in zip(out, ref, strict=True):
        assert got.shape == ids.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
    # both outputs carry a gradient (importance weights on log-probs, an entropy bonus)
    upstream = torch.randn(2, *ids.shape, dtype=torch.float64)
    assert_grads(torch.stack(out), torch.stack(ref), (hidden, weight, bias), dtype, upstream)
    return out


def test_logprobs_gradient_of_one_output(triton, seed):
    """Only the log-prob is used (entropy returned but not differentiated), and without entropy."""
    hidden, weight, bias = student()
    ids = torch.randint(0, V, (N,))
    ref = reference.fused_linear_logprobs(hidden, weight, ids, bias=bias, **HEAD)
    logprob, _entropy = triton[0](hidden, weight, ids, bias=bias, backend="triton", return_entropy=True, **HEAD)
    assert_grads(logprob, ref, (hidden, weight, bias), torch.float32)
    alone = triton[0](hidden, weight, ids, bias=bias, backend="triton", **HEAD)
    torch.testing.assert_close(alone, logprob)
    assert_grads(alone, ref, (hidden, weight, bias), torch.float32)


def test_logprobs_peaked_and_zero_mass_columns(triton, seed):
    """A token holding almost all the mass (log-prob ~ -1e-7) keeps its digits; -inf logits are legal."""
    hidden, weight, bias = student(spread=6.0)
    with torch.no_grad():
        bias[[5, 41]] = float("-inf")
    z = hidden.detach() @ weight.detach().T + bias.detach()
    ids = z.argmax(-1)
    lp, _ = compare_logprobs(triton[0], hidden, weight, bias, ids)
    ref = reference.fused_linear_logprobs(hidden, weight, ids, bias=bias)
    assert ref.max() > -1e-5  # the case is really peaked
    torch.testing.assert_close(lp.double(), ref, rtol=1e-4, atol=0)  # relative accuracy, however small


# ---- fused_linear_kl_topk ----------------------------------------------------------------------


def teacher(n=N, v=V, k=5, pad=True, full=None):
    """Top-k (ids, log-probs) of a random teacher; with ``pad`` some slots and one row are padding."""
    full = torch.log_softmax(2.0 * torch.randn(n, v, dtype=torch.float64), -1) if full is None else full
    log_p, ids = full.topk(k, -1)
    ids = ids[:, torch.randperm(k)]  # served top-k need not be sorted
    log_p = full.gather(1, ids).float()
    if pad:
        ids[0, 2:], log_p[0, 2:] = -1, 0.0
        ids[3, 1], log_p[3, 1] = -1, float("nan")
        ids[4], log_p[4] = -1, -3.0
    return ids, log_p


def compare_topk(fn, ids, log_p, dtype=torch.float32, leaves=None, upstream=None, **kw):
    """Loss, gradients (hidden, weight, bias) and stats of the Triton path against the reference."""
    hidden, weight, bias = leaves if leaves is not None else student(dtype)
    args = (hidden, weight, ids, log_p)
    out, stats = fn(*args, student_bias=bias, backend="triton", return_stats=True, **kw)
    ref, ref_stats = reference.fused_linear_kl_topk(*args, student_bias=bias, return_stats=True, **kw)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    assert set(stats) == set(STATS)
    for name in STATS:
        torch.testing.assert_close(stats[name].double(), ref_stats[name], **TOL[dtype], msg=name)
    assert_grads(out, ref, (hidden, weight, bias), dtype, upstream)
    return out, stats


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("k", [1, V])
def test_topk_k_one_and_whole_vocabulary(triton, seed, k, tail):
    """k = V: no tail category, every column is an id (the kernels' id walk covers whole tiles)."""
    compare_topk(triton[1], *teacher(k=k, pad=False), divergence="reverse_kl", tail=tail, **TOPK_HEAD)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_topk_mass_near_one(triton, seed, divergence):
    """The student's top-k holds all but ~1e-7 of its mass, the teacher's all but 1e-3.

    The tail is summed exactly (ids removed in the kernel), not subtracted: in fp32
    ``log(exp(lse) - sum_k exp(z_k))`` would get the student's tail log-mass wrong by O(1) here,
    and with it the tail category's value and the gradient on every tail column.
    """
    hidden, weight, bias = student()
    with torch.no_grad():
        bias[:4] += 22.0  # columns 0-3 dominate every row
    ids = torch.stack([torch.randperm(4) for _ in range(N)])
    with torch.no_grad():
        z = (hidden @ weight.T + bias).double().gather(1, ids)
    log_p = (torch.log_softmax(z + 0.5 * torch.randn(N, 4, dtype=torch.float64), -1) + math.log1p(-1e-3)).float()
    _, stats = compare_topk(triton[1], ids, log_p, leaves=(hidden, weight, bias), divergence=divergence)
    assert (1 - stats["student_topk_mass"].double()).max() < 1e-5  # the case is really at the edge


# ---- shared plumbing -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [80, 90])
def test_gpu_configs_in_the_interpreter(triton, seed, monkeypatch, arch):
    """The tile sizes shipped for GPUs (not the interpreter's minimum) give the same numbers."""
    monkeypatch.setattr(triton_rows, "pick_config", lambda kernel, *_: configs_for(kernel, arch, torch.float16)[-1])
    compare_topk(triton[1], *teacher(), divergence="forward_kl", **TOPK_HEAD)
    hidden, weight, bias = student()
    compare_logprobs(triton[0], hidden, weight, bias, torch.randint(0, V, (N,)), **HEAD)


def test_gradient_filter(triton, seed):
    """eps tiny: exact; eps huge: the dense tail gradient is skipped, the ids' columns remain."""
    hidden, weight, bias = student()
    ids, log_p = teacher()
    grads = {}
    for eps in (None, 1e-30, 1e30):
        loss = triton[1](hidden, weight, ids, log_p, student_bias=bias, backend="triton",
                         tuning=Tuning(grad_filter_eps=eps))
        grads[eps] = torch.autograd.grad(loss, (hidden, weight, bias))
    for exact, tiny, huge in zip(grads[None], grads[1e-30], grads[1e30], strict=True):
        torch.testing.assert_close(tiny, exact)
        assert not torch.allclose(huge, exact)
    touched = torch.zeros(V, dtype=torch.bool)
    touched[ids[ids >= 0]] = True
    assert torch.count_nonzero(grads[1e30][2][~touched]) == 0  # bias gradient only on teacher ids


def test_rejects_float64(triton, seed):
    hidden, weight, _ = student(torch.float64, bias=False)
    with pytest.raises(ValueError, match=r"supports fp32, fp16 and bf16 inputs; hidden is torch.float64"):
        triton[0](hidden, weight, torch.randint(0, V, (N,)), backend="triton")


def test_refuses_cpu_tensors_without_the_interpreter_and_is_never_auto_on_cpu(seed, monkeypatch):
    hidden, weight, _ = student(bias=False)
    ids = torch.randint(0, V, (N,))
    torch.testing.assert_close(opd_fast.fused_linear_logprobs(hidden, weight, ids, backend="auto"),
                               opd_fast.fused_linear_logprobs(hidden, weight, ids, backend="torch"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        opd_fast.fused_linear_logprobs(hidden, weight, ids, backend="triton")
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        opd_fast.fused_linear_kl_topk(hidden, weight, *teacher(), backend="triton")
