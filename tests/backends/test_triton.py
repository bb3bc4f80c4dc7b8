"""Triton backend: interpreter numerics against the float64 reference, and the compile check.

The kernels run under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` when no GPU is
present) on CPU tensors at tiny, odd shapes, through the public ``fused_linear_kl`` with
``backend="triton"`` (which the interpreter makes available for CPU tensors).
bf16 is covered by the compile check only (``tests/commands/test_kernels_check.py``): ``tl.dot`` on
bf16 is broken in the interpreter.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import opd_fast
from opd_fast import Tuning, reference
from opd_fast.backends import triton_backend
from opd_fast.backends.triton import configs_for, pick_config
from opd_fast.backends.triton.stripes import stripe_width
from opd_fast.core.dispatch import availability, resolve

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter numerics run on CPU tensors with TRITON_INTERPRET=1",
)

N, HS, HT, V = 13, 24, 48, 70  # odd rows; student K-loop masked (24), teacher's not (48); 3 vocab tiles
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float16: dict(rtol=3e-2, atol=3e-3)}
HEADS = dict(
    temperature=1.5, student_softcap=6.0, teacher_softcap=9.0, student_logit_scale=0.8, teacher_logit_scale=1.2
)


@pytest.fixture
def triton_loss():
    """The public ``fused_linear_kl`` (its ``backend="triton"`` runs the kernels in the interpreter)."""
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy inf - inf in masked lanes
    return opd_fast.fused_linear_kl


def make(dtype=torch.float32, v_s=V, v_t=V, bias=True):
    g = lambda *shape, s=1.0: (torch.randn(*shape) * s).to(dtype)
    t = dict(
        student_hidden=g(N, HS).requires_grad_(), student_weight=g(v_s, HS, s=0.5).requires_grad_(),
        teacher_hidden=g(N, HT), teacher_weight=g(v_t, HT, s=0.5),
    )
    if bias:
        t["student_bias"] = g(v_s).requires_grad_()
        t["teacher_bias"] = g(v_t)
    return t


def student_leaves(t):
    return [t[k] for k in ("student_hidden", "student_weight", "student_bias") if k in t]


def compare(fn, t, dtype=torch.float32, upstream=None, **kw):
    """Loss, gradients and stats of the Triton path against the reference, at ``dtype``'s tolerance."""
    tensors = dict(t)
    args = [tensors.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    out, stats = fn(*args, backend="triton", return_stats=True, **tensors, **kw)
    ref, ref_stats = reference.fused_linear_kl(*args, return_stats=True, **tensors, **kw)
    leaves = student_leaves(t)
    weight = upstream if upstream is not None else torch.ones_like(ref)
    grads = torch.autograd.grad((out * weight.to(out.dtype)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), leaves)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, **tol)
    for name in ref_stats:
        torch.testing.assert_close(stats[name].double(), ref_stats[name], **tol, msg=name)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        scale = r.double().abs().max().clamp_min(1e-12)  # gradients of a mean are small: compare relative to the max
        torch.testing.assert_close(g.double() / scale, r.double() / scale, **tol)
    return out, grads


def test_jsd_beta_endpoints_are_exactly_the_kls(triton_loss, seed):
    t = make(bias=False)
    args = [t[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    for beta, same in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = triton_loss(*args, divergence="jsd", beta=beta, backend="triton")
        assert torch.equal(jsd, triton_loss(*args, divergence=same, backend="triton"))


def test_fp16_teacher_fp32_student(triton_loss, seed):
    t = make(bias=False)
    t["teacher_hidden"], t["teacher_weight"] = t["teacher_hidden"].half(), t["teacher_weight"].half()
    compare(triton_loss, t, divergence="reverse_kl")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_identical_heads_give_zero(triton_loss, seed, divergence):
    """The one-pass KL is a difference of log-sum-exps: it must not lose a zero to cancellation."""
    h, w = torch.randn(N, HS) * 3, torch.randn(V, HS)
    value = triton_loss(h.requires_grad_(), w, h.detach(), w, divergence=divergence, backend="triton")
    (grad,) = torch.autograd.grad(value, h)
    assert abs(value.item()) < 2e-5
    assert grad.abs().max().item() < 1e-5


def test_gradient_filter(triton_loss, seed):
    t = make()
    args = [t[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    kw = dict(student_bias=t["student_bias"], teacher_bias=t["teacher_bias"], backend="triton", divergence="tvd")
    exact = torch.autograd.grad(triton_loss(*args, **kw), student_leaves(t))
    tiny = torch.autograd.grad(triton_loss(*args, tuning=Tuning(grad_filter_eps=1e-30), **kw), student_leaves(t))
    huge = torch.autograd.grad(triton_loss(*args, tuning=Tuning(grad_filter_eps=1e30), **kw), student_leaves(t))
    for e, s, h in zip(exact, tiny, huge, strict=True):
        torch.testing.assert_close(s, e)
        assert torch.count_nonzero(h) == 0


def hard_labels(ignore_index=-100, vocab=V):
    """Labels of the N rows: some ignored, two in the last (partial) vocab tile, one in the first column."""
    labels = torch.randint(0, vocab, (N,))
    labels[[1, 6]] = ignore_index
    labels[[0, 4]] = torch.tensor([vocab - 1, vocab - 5])
    labels[8] = 0
    return labels


def test_hard_labels_all_ignored_give_the_divergence_alone(triton_loss, seed):
    t = make(bias=False)
    args = [t[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    plain = triton_loss(*args, divergence="jsd", backend="triton", temperature=1.5)
    out, stats = triton_loss(*args, divergence="jsd", backend="triton", temperature=1.5, labels=torch.full((N,), -100),
                             hard_weight=2.0, return_stats=True)
    assert torch.equal(out, plain)
    assert torch.count_nonzero(stats["cross_entropy"]) == 0 and stats["hard_loss"].item() == 0.0


def test_hard_labels_gpu_configs_in_the_interpreter(triton_loss, seed, monkeypatch):
    """The wide shipped tiles (BLOCK_N 128: every label in the first tile) give the same numbers."""
    chosen = {kernel: configs_for(kernel, 90, torch.float16)[-1] for kernel in ("lse", "terms", "grad")}
    monkeypatch.setattr(triton_backend, "pick_config", lambda kernel, *_: chosen[kernel])
    compare(triton_loss, make(), divergence="reverse_kl", labels=hard_labels(), hard_weight=0.4, **HEADS)


def test_rejects_float64_and_is_never_auto_on_cpu(triton_loss, seed, monkeypatch):
    t = make(torch.float64, bias=False)
    with pytest.raises(ValueError, match=r"float64"):
        triton_loss(*t.values(), backend="triton")
    assert availability("triton", torch.device("cpu"))[0]  # the interpreter runs CPU tensors
    assert resolve("auto", torch.device("cpu")) != "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = availability("triton", torch.device("cpu"))
    assert not ok and "CUDA" in why


@pytest.mark.parametrize("arch", [80, 90])
def test_gpu_configs_in_the_interpreter(triton_loss, seed, monkeypatch, arch):
    """The tile sizes shipped for GPUs (not the interpreter's minimum) give the same numbers."""
    chosen = {kernel: configs_for(kernel, arch, torch.float16)[-1] for kernel in ("lse", "terms", "grad")}
    monkeypatch.setattr(triton_backend, "pick_config", lambda kernel, *_: chosen[kernel])
    compare(triton_loss, make(), divergence="tvd", **HEADS)


def test_config_heuristic():
    wide = pick_config("grad", 80, torch.bfloat16, 8192)
    assert wide == configs_for("grad", 80, torch.bfloat16)[-1] and wide.block_n == 128
    assert pick_config("tail_lse", 90, torch.bfloat16, 8192).block_n == 256
    assert pick_config("lse", 80, torch.bfloat16, 100) == configs_for("lse", 80, torch.bfloat16)[0]
    assert all(c.block_k == 16 for c in configs_for("grad", 86, torch.float32))


@pytest.mark.parametrize(
    ("budget_mb", "chunk_vocab", "n", "vocab", "width"),
    [
        (256.0, None, 8192, 128256, 16384),  # 8192 x 16384 bf16 = 256 MB
        (256.0, None, 16, 1000, 1024),  # never wider than the vocabulary needs (in blocks)
        (1e-6, None, 8192, 128256, 128),  # at least one block, whatever the budget
        (256.0, 200, 8192, 128256, 256),  # chunk_vocab wins, rounded up to a block
    ],
)
def test_stripe_width_follows_the_budget(budget_mb, chunk_vocab, n, vocab, width):
    tuning = Tuning(memory_budget_mb=budget_mb, chunk_vocab=chunk_vocab)
    assert stripe_width(tuning, n, vocab, torch.bfloat16, 128) == width


@pytest.mark.parametrize(("divergence", "used"), [("forward_kl", True), ("jsd", True), ("tvd", True),
                                                   ("reverse_kl", False)])
def test_teacher_lse_replaces_the_teacher_sweep(triton_loss, seed, divergence, used):
    """A given LSE is what the kernels use (a shifted one changes the result) except for reverse KL,
    whose one-pass sweep needs the teacher's logits anyway (and ignores it)."""
    t = make(bias=False)
    args = [t[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    _, stats = triton_loss(*args, divergence=divergence, backend="triton", return_stats=True)
    true = triton_loss(*args, divergence=divergence, backend="triton", teacher_lse=stats["teacher_lse"])
    shifted = triton_loss(*args, divergence=divergence, backend="triton", teacher_lse=stats["teacher_lse"] + 0.5)
    torch.testing.assert_close(true, triton_loss(*args, divergence=divergence, backend="triton"))
    assert (not torch.allclose(shifted, true)) == used


def test_tuning_rejects_an_unknown_triton_mode():
    with pytest.raises(ValueError, match=r"Tuning.triton_mode must be one of \('strict', 'cached'\), got 'fast'"):
        Tuning(triton_mode="fast")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_cached_mode_keeps_16_bit_logits_exact(triton_loss, seed, divergence):
    """Large fp16 logits (|z| ~ 30, where an fp16 logit is off by up to 0.008): the cached mode's logits keep the
    GEMM's fp32 accumulator, so its per-token result matches float64 on the same fp16 inputs at fp32 tolerance."""
    t = make(torch.float16, bias=False)
    t["student_hidden"] = (t["student_hidden"].detach() * 6).requires_grad_()
    t["teacher_hidden"] = t["teacher_hidden"] * 4
    args = [t[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    kw = dict(divergence=divergence, reduction="none")
    cached = triton_loss(*args, backend="triton", tuning=Tuning(chunk_tokens=4, triton_mode="cached"), **kw)
    exact = reference.fused_linear_kl(*args, **kw)
    torch.testing.assert_close(cached.double(), exact, rtol=1e-4, atol=1e-5)
