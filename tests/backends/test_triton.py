"""Triton backend: interpreter numerics against the float64 reference, and the compile check.

The kernels run under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` when no GPU is
present) on CPU tensors at tiny, odd shapes, through the public ``fused_linear_kl`` with
``backend="triton"`` (which the interpreter makes available for CPU tensors).
bf16 is covered by the compile check (``tests/commands/test_kernels_check.py``): ``tl.dot`` on bf16 is
broken in the interpreter. The cached mode's GEMM widens its operands to fp32 there (products of 16-bit
numbers are exact in fp32), so its bf16 numerics run here too, everything but the MMA instruction itself.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import opd_fast
from opd_fast import Tuning, reference
from opd_fast.backends import triton_backend
from opd_fast.backends.chunked import Head
from opd_fast.backends.triton import configs_for, pick_config
from opd_fast.backends.triton.cached_logits import INTERPRETER_TILES, shifted_logits
from opd_fast.backends.triton.stripes import stripe_width
from opd_fast.core.call import HeadSpec
from opd_fast.core.dispatch import availability, resolve

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter numerics run on CPU tensors with TRITON_INTERPRET=1",
)

N, HS, HT, V = 13, 24, 48, 70  # odd rows; student K-loop masked (24), teacher's not (48); 3 vocab tiles
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float16: dict(rtol=3e-2, atol=3e-3),
       torch.bfloat16: dict(rtol=5e-2, atol=1e-2)}
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


def compare(fn, t, dtype=torch.float32, upstream=None, tol=None, **kw):
    """Loss, gradients and stats of the Triton path against the reference, at ``tol`` (default ``dtype``'s)."""
    tensors = dict(t)
    args = [tensors.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    out, stats = fn(*args, backend="triton", return_stats=True, **tensors, **kw)
    ref, ref_stats = reference.fused_linear_kl(*args, return_stats=True, **tensors, **kw)
    leaves = student_leaves(t)
    weight = upstream if upstream is not None else torch.ones_like(ref)
    grads = torch.autograd.grad((out * weight.to(out.dtype)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), leaves)
    tol = tol or TOL[dtype]
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


CACHED = Tuning(chunk_tokens=4, triton_mode="cached")  # 4 chunks of the 13 rows


def large_logits(dtype: torch.dtype, shape: str) -> dict:
    """fp16 / bf16 inputs whose logits are large: ``peaked`` (|z| ~ 30, divergences ~ 60) or ``offset`` (every
    logit of a row ~ 100 + O(1): one hidden unit times a constant weight column; divergences ~ 1-10)."""
    t = make(torch.float32, bias=False)
    t = {k: v.detach() for k, v in t.items()}
    if shape == "peaked":
        t["student_hidden"], t["teacher_hidden"] = t["student_hidden"] * 6, t["teacher_hidden"] * 4
    else:
        for h, w in (("student_hidden", "student_weight"), ("teacher_hidden", "teacher_weight")):
            t[h][:, 0], t[w][:, 0] = 100.0, 1.0
    t = {k: v.to(dtype) for k, v in t.items()}
    t["student_hidden"].requires_grad_()
    return t


@pytest.mark.parametrize(("dtype", "shape", "divergence"), [
    (torch.float16, "peaked", "forward_kl"), (torch.bfloat16, "offset", "reverse_kl")])
def test_cached_mode_logit_error_follows_the_log_probabilities(triton_loss, seed, dtype, shape, divergence):
    """The fp16 tile-shifted cache keeps each log-probability to a relative 2^-11 (``cached_logits``'s argument:
    ``|z - m| <= -log q`` since the tile max is at most the LSE), whatever the logits' own magnitude, so per-token
    values and statistics match float64 on the same inputs to rtol 1e-3 (both heads' 2^-11, rounded up). A cache
    of bf16-rounded logits errs by up to 2^-8 |z| per logit instead: 1.4-7.7 % here (measured), and this test fails."""
    t = large_logits(dtype, shape)
    args = [t[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    kw = dict(divergence=divergence, reduction="none", return_stats=True)
    cached, stats = triton_loss(*args, backend="triton", tuning=CACHED, **kw)
    exact, exact_stats = reference.fused_linear_kl(*args, **kw)
    torch.testing.assert_close(cached.double(), exact, rtol=1e-3, atol=1e-5)
    for name in ("student_lse", "teacher_lse", "student_entropy"):
        torch.testing.assert_close(stats[name].double(), exact_stats[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize(("dtype", "divergence", "temperature", "reduction", "tuning"), [
    (torch.float16, "forward_kl", 1.0, "mean", CACHED),  # T = 1: the student's LSE and label logit from tile stats
    (torch.float16, "jsd", 1.5, "none", CACHED),  # labels at T != 1: the student's LSE of T z streamed from the cache
    (torch.bfloat16, "reverse_kl", 1.5, "sum", CACHED),
    (torch.bfloat16, "tvd", 1.0, "mean", CACHED),
    (torch.float32, "jsd", 1.0, "sum", CACHED),  # fp32: the torch GEMM's fp32 logits, exact
    ("fp16_teacher", "forward_kl", 1.5, "mean", CACHED),  # an fp32 student cache next to an fp16 shifted one
    # a vocabulary too wide for the budget: the chunk loop's 2-D regime, fp32 logits from torch matmul
    (torch.float16, "reverse_kl", 1.0, "mean", Tuning(chunk_tokens=4, chunk_vocab=32, triton_mode="cached")),
], ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else "2d" if isinstance(v, Tuning) and v.chunk_vocab
    else "rows" if isinstance(v, Tuning) else None)
def test_cached_mode_matches_the_reference(triton_loss, seed, dtype, divergence, temperature, reduction, tuning):
    """Every head feature at once (biases, scales, softcaps, temperature, a padded vocabulary with -inf bias
    columns, hard labels, masks and weights) through the cached mode against the float64 reference."""
    mixed = dtype == "fp16_teacher"
    dtype = torch.float32 if mixed else dtype
    t = make(dtype, v_s=V + 6, v_t=V + 3)
    t = {k: v.detach() for k, v in t.items()}
    t["student_bias"][[3, 40]] = float("-inf")  # a -inf logit with a softcap: -cap, no gradient
    t["teacher_bias"][40] = float("-inf")
    if mixed:
        t["teacher_hidden"], t["teacher_weight"], t["teacher_bias"] = (
            t[k].half() for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    for k in ("student_hidden", "student_weight", "student_bias"):
        t[k].requires_grad_()
    mask = torch.ones(N, dtype=torch.bool)
    mask[[2, 9]] = False
    upstream = torch.rand(N, dtype=torch.float64) + 0.5 if reduction == "none" else None
    tol = dict(rtol=1e-3, atol=2e-4) if mixed else None  # the fp16 teacher cache's 2^-11, not fp32's
    compare(triton_loss, t, dtype, upstream=upstream, tol=tol, divergence=divergence, tuning=tuning, vocab_size=V,
            labels=hard_labels(), hard_weight=0.4, mask=mask, token_weights=torch.rand(N) + 0.5,
            reduction=reduction, **{**HEADS, "temperature": temperature})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logit_cache_stores_shifted_values_and_tile_statistics(seed, dtype):
    """The GEMM kernel's cache of 40 rows (3 row blocks, 3 vocabulary tiles: the grouped tile order)
    reconstructs the fp32 logits to fp16's 2^-11 of each value's distance from its tile max; a -inf bias column
    stays -inf; the sum-exp statistics describe the stored logits; columns past ``vocab`` are never written."""
    n, vocab, cap, temperature = 40, 70, 8.0, 1.5
    h, w, b = torch.randn(n, HS).to(dtype), torch.randn(vocab + 5, HS).to(dtype), torch.randn(vocab + 5).to(dtype)
    b[7] = float("-inf")
    buffer = torch.full((n * (vocab + 5),), 7.0, dtype=torch.float16)  # a sentinel where nothing may be written
    cache = shifted_logits(h, Head(w, b, 0.8), HeadSpec(0.8, cap), temperature, vocab, buffer)
    tile = INTERPRETER_TILES.block_n
    assert cache.values.shape == (n, vocab) and cache.stats.shape == (2, n, -(-vocab // tile))
    assert torch.all(buffer[n * vocab:] == 7.0)
    shift = cache.stats[0].repeat_interleave(tile, 1)[:, :vocab]
    z = shift + cache.values.float()
    exact = 0.8 * (h.double() @ w[:vocab].double().T + b[:vocab].double())
    assert torch.all(cache.values <= 0) and torch.equal(z[:, 7], torch.full((n,), float("-inf")))
    finite = exact.isfinite()
    err = (z.double() - exact)[finite].abs()
    assert torch.all(err <= (exact - shift.double())[finite].abs() * 2**-11 + 1e-5)
    final = lambda x: cap * torch.tanh(x / cap) / temperature
    tiles = final(z.double()).split(tile, 1)
    tops = final(cache.stats[0].double()).split(1, 1)
    sums = torch.stack([(zt - top).exp().sum(1) for zt, top in zip(tiles, tops, strict=True)], 1)
    torch.testing.assert_close(cache.stats[1].double(), sums, rtol=1e-5, atol=0)
