"""The chunked-torch backend against the float64 reference: values, gradients, stats."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import opd_fast
from opd_fast import Tuning

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd"]
# Full rows (default plan) and the 2-D token x vocab regime with tiles that divide nothing.
TUNINGS = {"full_rows": None, "tiles_2d": Tuning(chunk_tokens=4, chunk_vocab=7)}


def make_case(n=11, h_s=6, h_t=9, v=29, dtype=torch.float64, seed=0, scale=1.0, leading=None):
    g = torch.Generator().manual_seed(seed)
    shape = leading or (n,)
    t = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    return dict(
        student_hidden=t(*shape, h_s).requires_grad_(),
        student_weight=t(v, h_s).requires_grad_(),
        teacher_hidden=t(*shape, h_t),
        teacher_weight=t(v, h_t),
        student_bias=t(v).requires_grad_(),
        teacher_bias=t(v),
    )


def run(case, backend, grad_seed=7, **kw):
    """Loss, stats and the student gradients of sum(loss * random) (covers non-scalar grads)."""
    for name in ("student_hidden", "student_weight", "student_bias"):
        case[name].grad = None
    loss, stats = opd_fast.fused_linear_kl(**case, backend=backend, return_stats=True, **kw)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=loss.dtype)
    (loss * upstream).sum().backward()
    grads = [case[n].grad.double().clone() for n in ("student_hidden", "student_weight", "student_bias")]
    return loss.double().detach(), {k: v.double() for k, v in stats.items()}, grads


def assert_close(a, b, tol):
    loss_a, stats_a, grads_a = a
    loss_b, stats_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, atol=tol, rtol=tol)
    for k in stats_a:
        torch.testing.assert_close(stats_a[k], stats_b[k], atol=tol, rtol=tol, msg=k)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=tol, rtol=tol)


@pytest.mark.parametrize("tuning", TUNINGS.values(), ids=TUNINGS.keys())
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_matches_reference_fp64(tuning, divergence, reduction, temperature):
    case = make_case(seed=hash((divergence, reduction, temperature)) % 1000)
    mask = torch.rand(11, generator=torch.Generator().manual_seed(1)) > 0.3
    weights = torch.rand(11, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = dict(divergence=divergence, reduction=reduction, temperature=temperature, beta=0.3,
              mask=mask, token_weights=weights, student_softcap=4.0, teacher_logit_scale=0.8)
    assert_close(run(case, "torch", tuning=tuning, **kw), run(case, "reference", **kw), 1e-10)


def test_gradcheck_small_float64():
    for div, tuning in itertools.product(DIVERGENCES, TUNINGS.values()):
        case = make_case(n=3, v=6, h_s=2, h_t=3, seed=11)
        hs, ws, bs = case["student_hidden"], case["student_weight"], case["student_bias"]

        def f(hs, ws, bs, div=div, tuning=tuning, ht=case["teacher_hidden"], wt=case["teacher_weight"]):
            return opd_fast.fused_linear_kl(
                hs, ws, ht, wt, student_bias=bs,
                divergence=div, reduction="none", temperature=1.5, backend="torch", tuning=tuning,
            )

        assert torch.autograd.gradcheck(f, (hs, ws, bs), atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 20),
    v=st.integers(2, 40),
    h_s=st.integers(1, 8),
    h_t=st.integers(1, 8),
    divergence=st.sampled_from(DIVERGENCES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    beta=st.floats(0.0, 1.0),
    temperature=st.floats(0.25, 4.0),
    chunk_tokens=st.integers(1, 8),
    chunk_vocab=st.one_of(st.none(), st.integers(1, 16)),
    masked=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_fuzz_against_reference(n, v, h_s, h_t, divergence, reduction, beta, temperature, chunk_tokens, chunk_vocab,
                                masked, seed):
    case = make_case(n=n, v=v, h_s=h_s, h_t=h_t, seed=seed)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5 if masked else None
    kw = dict(divergence=divergence, reduction=reduction, beta=beta, temperature=temperature, mask=mask)
    tuning = Tuning(chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    assert_close(run(case, "torch", tuning=tuning, **kw), run(case, "reference", **kw), 1e-9)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tuning", TUNINGS.values(), ids=TUNINGS.keys())
def test_all_masked_is_zero_with_zero_grads(divergence, tuning):
    case = make_case(seed=2)
    mask = torch.zeros(11, dtype=torch.bool)
    for reduction in ("mean", "sum", "none"):
        loss, stats, grads = run(case, "torch", divergence=divergence, mask=mask, reduction=reduction, tuning=tuning)
        assert torch.equal(loss, torch.zeros_like(loss))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
        assert all(torch.equal(s, torch.zeros_like(s)) for s in stats.values())


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tuning", TUNINGS.values(), ids=TUNINGS.keys())
def test_minus_inf_logits_through_biases(divergence, tuning):
    case = make_case(seed=4)
    for side in ("student_bias", "teacher_bias"):
        case[side] = case[side].detach().clone()
        case[side][[2, 9]] = float("-inf")
    case["teacher_bias"][13] = float("-inf")  # teacher-only zero: reverse KL is +inf
    case["student_bias"].requires_grad_()
    ours = run(case, "torch", divergence=divergence, tuning=tuning, reduction="none")
    ref = run(case, "reference", divergence=divergence, reduction="none")
    if divergence == "reverse_kl":
        assert torch.isinf(ours[0]).all() and torch.isinf(ref[0]).all()
        return
    assert_close(ours, ref, 1e-10)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_student_equal_teacher_gives_zero_loss_and_grads(divergence):
    case = make_case(h_t=6, seed=8)
    case["teacher_hidden"] = case["student_hidden"].detach().clone()
    case["teacher_weight"] = case["student_weight"].detach().clone()
    case["teacher_bias"] = case["student_bias"].detach().clone()
    loss, _, grads = run(case, "torch", divergence=divergence, reduction="sum")
    assert abs(loss.item()) < 1e-12
    assert all(g.abs().max() < 1e-10 for g in grads)


def test_no_grad_gives_loss_only():
    case = make_case(seed=9)
    with torch.no_grad():
        loss = opd_fast.fused_linear_kl(**case, backend="torch")
    ref = opd_fast.fused_linear_kl(**case, backend="reference")
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-10, rtol=1e-10)


def test_gradient_filter_eps_zero_is_exact_and_large_eps_drops_blocks():
    case = make_case(n=6, v=64, seed=10)
    exact = run(case, "torch", reduction="sum")
    filtered = run(case, "torch", reduction="sum", tuning=Tuning(grad_filter_eps=0.0, filter_block=8))
    assert_close(filtered, exact, 1e-12)
    # a huge threshold skips every block: no gradient reaches the weights
    dropped = run(case, "torch", reduction="sum", tuning=Tuning(grad_filter_eps=1e9, filter_block=8))
    assert torch.equal(dropped[2][1], torch.zeros_like(dropped[2][1]))


def test_trl_and_liger_cross_checks():
    trl_gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    case = make_case(n=10, v=40, h_s=8, h_t=8, dtype=torch.float32, seed=12)
    hs, ws, ht, wt = (case[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"))
    for beta in (0.0, 0.4, 1.0):
        ours = opd_fast.fused_linear_kl(hs, ws, ht, wt, divergence="jsd", beta=beta, temperature=2.0, backend="torch",
                                        reduction="sum")
        trl = trl_gkd.GKDTrainer.generalized_jsd_loss(hs @ ws.T, ht @ wt.T, beta=beta, temperature=2.0,
                                                      reduction="sum")
        torch.testing.assert_close(ours, trl.float(), atol=1e-5, rtol=1e-5)
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    labels = torch.randint(0, 40, (10,))
    for beta in (0.0, 0.4, 1.0):
        loss_fn = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                                temperature=1.0, compiled=False)
        theirs = loss_fn(hs, ws, ht, wt, labels)
        ours = opd_fast.fused_linear_kl(hs, ws, ht, wt, divergence="jsd", beta=beta, backend="torch")
        torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)


# ---- hard-label mixing: the cross-entropy rides in the same sweep ---------------------------------


def _labels(n, v, seed, ignore=-100):
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    labels[::4] = ignore
    labels[1] = v - 1  # a label in the last (partial) vocab tile
    return labels


@pytest.mark.parametrize("tuning", TUNINGS.values(), ids=TUNINGS.keys())
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 1.6])
def test_hard_labels_match_reference_fp64(tuning, divergence, reduction, temperature):
    case = make_case(seed=hash((divergence, reduction, temperature, "hard")) % 1000)
    mask = torch.rand(11, generator=torch.Generator().manual_seed(3)) > 0.2
    kw = dict(divergence=divergence, beta=0.3, reduction=reduction, temperature=temperature, mask=mask,
              labels=_labels(11, 29, 4), hard_weight=0.6, student_softcap=4.0, student_logit_scale=1.3,
              temperature_sq_scaling=True)
    assert_close(run(case, "torch", tuning=tuning, **kw), run(case, "reference", **kw), 1e-9)


@pytest.mark.parametrize("tuning", TUNINGS.values(), ids=TUNINGS.keys())
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_hard_labels_low_precision_and_vocab_size(tuning, dtype, tol):
    case = make_case(dtype=dtype, v=31, seed=9)
    kw = dict(divergence="jsd", temperature=1.0, labels=_labels(11, 27, 5, ignore=-1), ignore_index=-1,
              hard_weight=1.5, vocab_size=27, num_items=20.0)
    ref = run({k: v.double().detach().requires_grad_(v.requires_grad) for k, v in case.items()}, "reference", **kw)
    assert_close(run(case, "torch", tuning=tuning, **kw), ref, tol)


def test_hard_labels_all_ignored_or_masked_give_the_divergence_alone():
    case = make_case(seed=11)
    plain = run(case, "torch")
    ignored = run(case, "torch", labels=torch.full((11,), -100), hard_weight=2.0)
    torch.testing.assert_close(ignored[0], plain[0])
    for a, b in zip(ignored[2], plain[2], strict=True):
        torch.testing.assert_close(a, b)
    masked = run(case, "torch", labels=_labels(11, 29, 6), hard_weight=2.0, mask=torch.zeros(11, dtype=torch.bool))
    assert masked[0] == 0 and all(bool((g == 0).all()) for g in masked[2])


def test_hard_labels_without_gradients_give_the_value():
    case = {k: v.detach() for k, v in make_case(seed=12).items()}
    kw = dict(labels=_labels(11, 29, 7), hard_weight=0.5, reduction="sum")
    with torch.no_grad():
        got = opd_fast.fused_linear_kl(**case, backend="torch", **kw)
    torch.testing.assert_close(got.double(), opd_fast.fused_linear_kl(**case, backend="reference", **kw))


@pytest.mark.parametrize("tuning", TUNINGS.values(), ids=TUNINGS.keys())
def test_teacher_lse_skips_the_teacher_in_the_tiled_lse_pass(tuning):
    """The 2-D regime uses a given teacher LSE instead of sweeping the teacher for it (a shifted one
    shows); full rows hold the teacher's logits anyway and take their own."""
    case = make_case()
    _, stats, _ = run(case, "torch", tuning=tuning)
    shifted = run(case, "torch", tuning=tuning, teacher_lse=stats["teacher_lse"] + 0.5)
    assert_close(run(case, "torch", tuning=tuning, teacher_lse=stats["teacher_lse"]), run(case, "torch", tuning=tuning),
                 1e-10)
    assert torch.allclose(shifted[1]["teacher_lse"], stats["teacher_lse"]) == (tuning is None)
