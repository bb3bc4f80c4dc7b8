"""fused_linear_kl_topk: values and gradients vs the float64 reference, semantics, bad input."""

import itertools
import math

import pytest
import torch

import opd_fast
from opd_fast import Tuning, reference
from opd_fast.core.dispatch import availability

SMALL = Tuning(chunk_tokens=4)  # several chunks even for tiny inputs
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TAILS = ("bucket", "renormalize")


def _student(n=11, h=8, v=29, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (0.7 * torch.randn(v, h, generator=g, dtype=dtype)).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    return hidden, weight, b


def _teacher(n=11, v=29, k=5, seed=1, temperature=1.0):
    """Top-k (ids, log-probs) of a random full teacher distribution, plus the full log-probs."""
    g = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(2.0 * torch.randn(n, v, generator=g, dtype=torch.float64) / temperature, -1)
    log_p, ids = full.topk(k, -1)
    return ids, log_p, full


def _pad(ids, log_p):
    """Pad some slots (id -1, garbage log-prob) and one whole row."""
    ids, log_p = ids.clone(), log_p.clone()
    ids[0, 2:], log_p[0, 2:] = -1, 0.0
    ids[3, 1], log_p[3, 1] = -1, float("nan")
    ids[4], log_p[4] = -1, -3.0
    return ids, log_p


def _grads(loss, upstream, inputs):
    return torch.autograd.grad((loss * upstream).sum(), [t for t in inputs if t is not None])


def _compare(student, ids, log_p, atol=1e-10, rtol=1e-9, **opts):
    """Fast path vs reference: value, gradients (random upstream for per-token outputs) and stats."""
    hidden, weight, bias = student
    out, stats = opd_fast.fused_linear_kl_topk(
        hidden, weight, ids, log_p, student_bias=bias, return_stats=True, tuning=SMALL, **opts
    )
    ref, ref_stats = reference.fused_linear_kl_topk(hidden, weight, ids, log_p, student_bias=bias,
                                                    return_stats=True, **opts)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    for got, want in zip(_grads(out, upstream.to(out.dtype), student), _grads(ref, upstream, student), strict=True):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    assert set(stats) == set(ref_stats) == {"divergence", "student_lse", "student_entropy",
                                             "student_topk_mass", "teacher_topk_mass"}
    for name, value in stats.items():
        torch.testing.assert_close(value.double(), ref_stats[name], atol=atol, rtol=rtol)
    return out


@pytest.mark.parametrize(("divergence", "tail"), list(itertools.product(DIVERGENCES, TAILS)))
def test_matches_reference_with_every_option(divergence, tail):
    student = _student()
    ids, log_p = _pad(*_teacher()[:2])
    mask = torch.ones(11, dtype=torch.bool)
    mask[[2, 7]] = False
    weights = torch.rand(11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    common = dict(divergence=divergence, beta=0.3, tail=tail, mask=mask, temperature=1.3,
                  student_logit_scale=0.8, student_softcap=5.0)
    for reduction in ("mean", "sum", "none"):
        _compare(student, ids, log_p, reduction=reduction, token_weights=weights, **common)
    _compare(student, ids, log_p, reduction="mean", num_items=17.0, temperature_sq_scaling=True,
             **{**common, "mask": None})


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_exact(tail, beta):
    student = _student(bias=False)
    ids, log_p, _ = _teacher()
    jsd = opd_fast.fused_linear_kl_topk(*student[:2], ids, log_p, divergence="jsd", beta=beta, tail=tail,
                                        reduction="none")
    other = "forward_kl" if beta == 0.0 else "reverse_kl"
    torch.testing.assert_close(jsd, opd_fast.fused_linear_kl_topk(*student[:2], ids, log_p, divergence=other,
                                                                  tail=tail, reduction="none"))


def test_bucket_by_hand():
    """Forward and reverse KL with the bucket, written out for one token."""
    hidden = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    weight = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([[1, 0]])
    log_p = torch.tensor([[0.5, 0.3]], dtype=torch.float64).log()
    q = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64), 0)
    q_cat = torch.stack([q[1], q[0], q[2] + q[3]])
    p_cat = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    fwd = opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, reduction="sum")
    rev = opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, divergence="reverse_kl", reduction="sum")
    torch.testing.assert_close(fwd, (p_cat * (p_cat / q_cat).log()).sum())
    torch.testing.assert_close(rev, (q_cat * (q_cat / p_cat).log()).sum())
    ren = opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, tail="renormalize", reduction="sum")
    p_top, q_top = p_cat[:2] / 0.8, q_cat[:2] / q_cat[:2].sum()
    torch.testing.assert_close(ren, (p_top * (p_top / q_top).log()).sum())


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_full_vocabulary_top_k_equals_full_logits_loss(divergence, tail):
    """k = V: both tails reduce to fused_linear_kl on the teacher's full distribution."""
    temperature, v = 1.7, 29
    hidden, weight, bias = _student(v=v)
    g = torch.Generator().manual_seed(5)
    teacher_hidden = torch.randn(11, 6, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(v, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        t_logits = teacher_hidden @ teacher_weight.T
        log_p = torch.log_softmax(t_logits / temperature, -1)
    perm = torch.stack([torch.randperm(v, generator=g) for _ in range(11)])  # any order of the k = V slots
    opts = dict(divergence=divergence, beta=0.4, temperature=temperature, student_softcap=4.0, reduction="none")
    topk = opd_fast.fused_linear_kl_topk(hidden, weight, perm, log_p.gather(1, perm), tail=tail,
                                         student_bias=bias, **opts)
    full = opd_fast.fused_linear_kl(hidden, weight, teacher_hidden, teacher_weight, student_bias=bias,
                                    backend="torch", **opts)
    torch.testing.assert_close(topk, full, rtol=1e-9, atol=1e-10)
    upstream = torch.randn(11, dtype=torch.float64)
    for got, want in zip(_grads(topk, upstream, (hidden, weight, bias)),
                         _grads(full, upstream, (hidden, weight, bias)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equals_one(divergence):
    student = _student()
    ids, log_p, _ = _teacher(k=1)
    _compare(student, ids, log_p, divergence=divergence, tail="bucket", reduction="none")
    # Renormalized over one id, both distributions are a point mass: nothing to learn.
    ren = opd_fast.fused_linear_kl_topk(*student[:2], ids, log_p, divergence=divergence, tail="renormalize",
                                        student_bias=student[2], reduction="none")
    assert torch.equal(ren, torch.zeros_like(ren))
    assert all(g.abs().max() == 0 for g in torch.autograd.grad(ren.sum(), student))


def test_padding_slots_are_ignored():
    hidden, weight, _ = _student(bias=False)
    ids, log_p, _ = _teacher(k=4)
    padded_ids = torch.cat([ids[:, :2], torch.full((11, 3), -1), ids[:, 2:]], 1)
    padded_lp = torch.cat([log_p[:, :2], torch.full((11, 3), 7.0), log_p[:, 2:]], 1)  # garbage under padding
    for tail in TAILS:
        a = opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, tail=tail, reduction="none")
        b = opd_fast.fused_linear_kl_topk(hidden, weight, padded_ids, padded_lp, tail=tail, reduction="none")
        torch.testing.assert_close(a, b)
    all_pad = torch.full((11, 3), -1)
    for tail in TAILS:
        loss = opd_fast.fused_linear_kl_topk(hidden, weight, all_pad, torch.zeros(11, 3, dtype=torch.float64),
                                             tail=tail, divergence="reverse_kl")
        assert loss == 0
        assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, (hidden, weight)))


def test_temperature_applies_to_the_student_only():
    hidden, weight, _ = _student(bias=False)
    ids, log_p, _ = _teacher()
    hot = opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, temperature=2.5, reduction="none")
    scaled = opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, student_logit_scale=0.4, reduction="none")
    torch.testing.assert_close(hot, scaled)


def test_teacher_mass_at_or_above_one_stays_finite():
    """Rounded teachers: the top-k can sum to >= 1; the bucket's floor keeps reverse KL finite."""
    student = _student()
    ids, log_p, _ = _teacher(k=3)
    log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)  # all mass on the top-k
    log_p[:, 0] += 5e-5  # a little over one, within the rounding tolerance
    for divergence in DIVERGENCES:
        loss = _compare(student, ids, log_p, divergence=divergence, reduction="none")
        assert torch.isfinite(loss).all()
    rev = opd_fast.fused_linear_kl_topk(*student[:2], ids, log_p, divergence="reverse_kl", reduction="none",
                                        student_bias=student[2])
    # The student keeps most of its mass outside the top-k: a large (finite) penalty from the floor.
    assert (rev > 1.0).all() and (rev < -math.log(reference.TOPK_TAIL_FLOOR)).all()


def test_leading_shape_vocab_size_and_masked_garbage():
    hidden, weight, bias = _student(n=12, v=33)
    ids, log_p, _ = _teacher(n=12, v=29)  # teacher over the first 29 entries of a padded head
    mask = torch.ones(12, dtype=torch.bool)
    mask[5] = False
    ids, log_p = ids.clone(), log_p.clone()
    ids[5], log_p[5] = 999, 3.0  # masked tokens are never read
    opts = dict(vocab_size=29, mask=mask.view(3, 4), reduction="none")
    out = _compare((hidden.view(3, 4, 8), weight, bias), ids.view(3, 4, 5), log_p.view(3, 4, 5), **opts)
    assert out.shape == (3, 4) and out.view(-1)[5] == 0


def test_all_masked_and_tiny_budget():
    hidden, weight, _ = _student(bias=False)
    ids, log_p, _ = _teacher()
    loss = opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, mask=torch.zeros(11, dtype=torch.bool))
    assert loss == 0
    assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, (hidden, weight)))
    tiny = opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, tuning=Tuning(memory_budget_mb=1e-3))
    torch.testing.assert_close(tiny, opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p))


def test_backend_choices():
    hidden, weight, _ = _student(bias=False)
    ids, log_p, _ = _teacher()
    ref = opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, backend="reference")
    torch.testing.assert_close(opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, backend="auto"), ref)
    if availability("cpu", hidden.device)[0]:  # the native kernel on fp32 (float64 stays in torch)
        got = opd_fast.fused_linear_kl_topk(hidden.float(), weight.float(), ids, log_p, backend="cpu")
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def _bad(**change):
    hidden, weight, _ = _student(bias=False)
    ids, log_p, _ = _teacher()
    args = dict(student_hidden=hidden, student_weight=weight, teacher_topk_ids=ids, teacher_topk_logprobs=log_p)
    opts = {k: v for k, v in change.items() if k not in args}
    for key in args.keys() & change.keys():
        value = change[key]
        args[key] = value(args[key]) if callable(value) else value
    return lambda: opd_fast.fused_linear_kl_topk(*args.values(), **opts)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (_bad(teacher_topk_ids=lambda t: t.index_fill(1, torch.tensor([0]), 29)),
         r"teacher_topk_ids must be in \[0, 29\) or -1 \(padding\), got values in \[.*, 29\]"),
        (_bad(teacher_topk_ids=lambda t: t.index_fill(1, torch.tensor([0]), -2)), r"must be in \[0, 29\) or -1"),
        (_bad(teacher_topk_ids=lambda t: t.float()), "teacher_topk_ids must be an integer tensor"),
        (_bad(teacher_topk_ids=lambda t: t.index_fill(1, torch.tensor([1]), 3).index_fill(1, torch.tensor([0]), 3)),
         "must not repeat an id within a token's top-k"),
        (_bad(teacher_topk_logprobs=lambda t: t + 0.5), r"must be log-probabilities <= 0 .* maximum of"),
        (_bad(teacher_topk_logprobs=lambda t: t.index_fill(1, torch.tensor([2]), float("nan"))), "must not be NaN"),
        (_bad(teacher_topk_logprobs=lambda t: t[:, :4]),
         r"teacher_topk_logprobs has shape \(11, 4\) but teacher_topk_ids has shape \(11, 5\)"),
        (_bad(teacher_topk_logprobs=lambda t: t.long()), "teacher_topk_logprobs must be a floating-point tensor"),
        (_bad(teacher_topk_ids=lambda t: t[:10], teacher_topk_logprobs=lambda t: t[:10]),
         r"teacher_topk_ids must start with the leading shape \(11,\)"),
        (_bad(teacher_topk_ids=lambda t: t[:, :0], teacher_topk_logprobs=lambda t: t[:, :0]), "k .* must be >= 1"),
        (_bad(teacher_topk_ids=lambda t: t[:, 0], teacher_topk_logprobs=lambda t: t[:, 0]),
         r"teacher_topk_ids must have shape \(\*\(11,\), k\)"),
        (_bad(teacher_topk_logprobs=lambda t: torch.full_like(t, float("-inf")), tail="renormalize"),
         "all -inf on a token whose top-k is renormalized"),
        (_bad(tail="drop"), r"tail must be one of \('bucket', 'renormalize'\)"),
        (_bad(teacher_topk_logprobs=lambda t: torch.full_like(t, -0.2)), r"sum to a probability of 4\.094 > 1"),
        (_bad(beta=True), r"beta must be in \[0, 1\], got True"),
        (_bad(num_items=True), "num_items must be a finite number > 0, got True"),
        (_bad(token_weights=-torch.ones(11)), "token_weights must be >= 0 on counted tokens"),
        (_bad(divergence="kl"), "divergence must be one of"),
        (_bad(vocab_size=3), r"ids must be in \[0, 3\)"),
        (_bad(backend="gpu"), "backend must be one of"),
        (_bad(student_weight=lambda t: t[:, :5]), "student_hidden has hidden size 8 but student_weight has shape"),
        (_bad(mask=torch.ones(3, dtype=torch.bool)), r"mask must have the leading shape \(11,\)"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
