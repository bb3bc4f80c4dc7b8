"""The reference math itself: hand-computed cases, identities, validation, TRL parity."""

import math

import pytest
import torch

from opd_fast import reference

P = [0.5, 0.25, 0.25]  # teacher
Q = [0.25, 0.5, 0.25]  # student


def _onehot_heads(student_probs, teacher_probs):
    """Hidden = log-probs, weight = identity: the logits are exactly log p / log q."""
    hs = torch.tensor([student_probs], dtype=torch.float64).log().requires_grad_()
    ht = torch.tensor([teacher_probs], dtype=torch.float64).log()
    eye = torch.eye(len(student_probs), dtype=torch.float64)
    return hs, eye.clone().requires_grad_(), ht, eye


@pytest.mark.parametrize(
    "divergence,beta,expected",
    [
        ("forward_kl", 0.5, 0.5 * math.log(2) + 0.25 * math.log(0.5)),
        ("reverse_kl", 0.5, 0.25 * math.log(0.5) + 0.5 * math.log(2)),
        ("tvd", 0.5, 0.25),
        ("jsd", 0.5, 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)),
        # beta = 0.25: M = 0.25 p + 0.75 q = [0.3125, 0.4375, 0.25]
        (
            "jsd",
            0.25,
            0.25 * (0.5 * math.log(0.5 / 0.3125) + 0.25 * math.log(0.25 / 0.4375))
            + 0.75 * (0.25 * math.log(0.25 / 0.3125) + 0.5 * math.log(0.5 / 0.4375)),
        ),
    ],
)
def test_hand_computed_single_token(divergence, beta, expected):
    hs, ws, ht, wt = _onehot_heads(Q, P)
    loss = reference.fused_linear_kl(hs, ws, ht, wt, divergence=divergence, beta=beta)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_hand_computed_reductions_with_weights_and_mask():
    # three tokens: (q, p), (p, p), (p, q); token 1 has zero divergence, token 2 is masked out
    hs = torch.tensor([Q, P, P], dtype=torch.float64).log()
    ht = torch.tensor([P, P, Q], dtype=torch.float64).log()
    eye = torch.eye(3, dtype=torch.float64)
    kl = 0.25 * math.log(2)
    w = torch.tensor([2.0, 1.0, 5.0], dtype=torch.float64)
    mask = torch.tensor([True, True, False])
    kw = dict(token_weights=w, mask=mask)
    assert reference.fused_linear_kl(hs, eye, ht, eye, reduction="sum", **kw).item() == pytest.approx(2 * kl)
    assert reference.fused_linear_kl(hs, eye, ht, eye, reduction="mean", **kw).item() == pytest.approx(2 * kl / 3)
    assert reference.fused_linear_kl(hs, eye, ht, eye, num_items=4, **kw).item() == pytest.approx(2 * kl / 4)
    none = reference.fused_linear_kl(hs, eye, ht, eye, reduction="none", **kw)
    assert torch.allclose(none, torch.tensor([2 * kl, 0.0, 0.0], dtype=torch.float64))
    # T^2 scaling at T=2 multiplies the value at T=2 by 4
    a = reference.fused_linear_kl(hs, eye, ht, eye, reduction="sum", temperature=2.0, **kw)
    b = reference.fused_linear_kl(hs, eye, ht, eye, reduction="sum", temperature=2.0, temperature_sq_scaling=True, **kw)
    assert b.item() == pytest.approx(4 * a.item())


def _random_case(n=6, h_s=5, h_t=7, v=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h_s, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, h_s, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(n, h_t, generator=g, dtype=torch.float64)
    wt = torch.randn(v, h_t, generator=g, dtype=torch.float64)
    return hs, ws, ht, wt


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_divergence_of_a_distribution_with_itself_is_zero(divergence):
    hs, ws, _, _ = _random_case()
    loss = reference.fused_linear_kl(hs, ws, hs.detach(), ws.detach(), divergence=divergence)
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert hs.grad.abs().max() < 1e-10 and ws.grad.abs().max() < 1e-10


def test_jsd_symmetric_at_half_and_endpoints_exact():
    hs, ws, ht, wt = _random_case()
    ab = reference.fused_linear_kl(hs, ws, ht, wt, divergence="jsd", beta=0.5, reduction="none")
    ba = reference.fused_linear_kl(ht, wt, hs, ws, divergence="jsd", beta=0.5, reduction="none")
    assert torch.allclose(ab, ba, atol=1e-12)
    fwd = reference.fused_linear_kl(hs, ws, ht, wt, divergence="forward_kl", reduction="none")
    rev = reference.fused_linear_kl(hs, ws, ht, wt, divergence="reverse_kl", reduction="none")
    assert torch.equal(reference.fused_linear_kl(hs, ws, ht, wt, divergence="jsd", beta=0.0, reduction="none"), fwd)
    assert torch.equal(reference.fused_linear_kl(hs, ws, ht, wt, divergence="jsd", beta=1.0, reduction="none"), rev)
    # just inside the endpoints the generalized JSD is small, not KL: the endpoints are special-cased
    near0 = reference.fused_linear_kl(hs, ws, ht, wt, divergence="jsd", beta=1e-6, reduction="none")
    assert (near0 < fwd).all()


def test_tvd_bounded_and_kl_nonnegative():
    hs, ws, ht, wt = _random_case(n=32)
    tvd = reference.fused_linear_kl(hs * 10, ws, ht * 10, wt, divergence="tvd", reduction="none")
    assert (tvd >= 0).all() and (tvd <= 1 + 1e-12).all()
    for div in ("forward_kl", "reverse_kl", "jsd"):
        assert (reference.fused_linear_kl(hs, ws, ht, wt, divergence=div, reduction="none") >= 0).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_all_masked_gives_zero_loss_and_zero_grads(divergence):
    hs, ws, ht, wt = _random_case()
    mask = torch.zeros(hs.shape[0], dtype=torch.bool)
    for reduction in ("mean", "sum"):
        loss = reference.fused_linear_kl(hs, ws, ht, wt, divergence=divergence, mask=mask, reduction=reduction)
        loss.backward()
        assert loss.item() == 0.0 and not torch.isnan(loss)
        assert torch.equal(hs.grad, torch.zeros_like(hs)) and torch.equal(ws.grad, torch.zeros_like(ws))
        hs.grad = ws.grad = None


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_minus_inf_logits_through_biases(divergence):
    hs, ws, ht, wt = _random_case()
    bias_s = torch.zeros(ws.shape[0], dtype=torch.float64)
    bias_t = torch.zeros(ws.shape[0], dtype=torch.float64)
    bias_s[[1, 3]] = float("-inf")  # both sides forbid entries 1 and 3
    bias_t[[1, 3]] = float("-inf")
    bias_t[5] = float("-inf")  # only the teacher forbids 5: fine for forward KL, +inf reverse KL
    loss = reference.fused_linear_kl(
        hs, ws, ht, wt, divergence=divergence, student_bias=bias_s, teacher_bias=bias_t, reduction="none"
    )
    assert not torch.isnan(loss).any()
    if divergence == "reverse_kl":
        assert torch.isinf(loss).all()
    else:
        assert torch.isfinite(loss).all()
        loss.sum().backward()
        assert torch.isfinite(hs.grad).all()


def test_vocab_size_truncation_compares_first_k():
    hs, ws, ht, wt = _random_case(v=9)
    wt_padded = torch.cat([wt, torch.randn(3, wt.shape[1], dtype=torch.float64)])
    with pytest.raises(ValueError, match="student vocab size 9 != teacher vocab size 12"):
        reference.fused_linear_kl(hs, ws, ht, wt_padded)
    a = reference.fused_linear_kl(hs, ws, ht, wt_padded, vocab_size=9)
    b = reference.fused_linear_kl(hs, ws, ht, wt)
    assert a.item() == pytest.approx(b.item(), abs=1e-14)


def test_scale_softcap_temperature_order():
    hs, ws, ht, wt = _random_case()
    kw = dict(student_logit_scale=2.0, student_softcap=3.0, temperature=1.5, reduction="none")
    z = 3.0 * torch.tanh(2.0 * (hs @ ws.T) / 3.0) / 1.5
    zt = (ht @ wt.T) / 1.5
    manual = reference.divergence_from_logits(z, zt, "forward_kl")
    assert torch.allclose(reference.fused_linear_kl(hs, ws, ht, wt, **kw), manual, atol=1e-12)


def test_stats_are_consistent():
    hs, ws, ht, wt = _random_case()
    _, stats = reference.fused_linear_kl(hs, ws, ht, wt, return_stats=True)
    zs = (hs @ ws.T).detach()
    q = zs.softmax(-1)
    assert torch.allclose(stats["student_lse"], zs.logsumexp(-1))
    assert torch.allclose(stats["teacher_lse"], (ht @ wt.T).logsumexp(-1))
    assert torch.allclose(stats["student_entropy"], -(q * q.log()).sum(-1))
    assert not stats["divergence"].requires_grad


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(divergence="kl"), "divergence must be one of"),
        (dict(beta=1.5), "beta must be in"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(reduction="batchmean"), "reduction must be one of"),
        (dict(mask=torch.ones(5, dtype=torch.bool)), r"mask must have the leading shape \(6,\), got \(5,\)"),
        (dict(mask=torch.ones(6)), "mask must be bool"),
        (dict(token_weights=torch.ones(2, 3)), "token_weights must have the leading shape"),
        (dict(num_items=0), "num_items must be"),
        (dict(student_softcap=-1.0), "student_softcap must be"),
        (dict(student_bias=torch.zeros(4, dtype=torch.float64)), r"student_bias must have shape \(9,\)"),
        (dict(vocab_size=10), r"vocab_size must be an int in \[1, 9\]"),
        (dict(teacher_lse=torch.zeros(5)), r"teacher_lse must have the leading shape \(6,\) of the hidden states"),
        (dict(teacher_lse=torch.zeros(6, dtype=torch.long)), "teacher_lse must be floating point"),
        (dict(teacher_lse=torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0, 0.0])),
         "teacher_lse must be finite on counted tokens.*1 non-finite"),
        (dict(teacher_lse=torch.full((6,), float("inf"))), "teacher_lse must be finite"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    hs, ws, ht, wt = _random_case()
    with pytest.raises(ValueError, match=match):
        reference.fused_linear_kl(hs, ws, ht, wt, **kwargs)


def test_bad_tensors_name_the_argument():
    hs, ws, ht, wt = _random_case()
    with pytest.raises(ValueError, match=r"student_hidden has hidden size 5 but student_weight has shape \(9, 4\)"):
        reference.fused_linear_kl(hs, ws[:, :4], ht, wt)
    with pytest.raises(ValueError, match="share their leading shape"):
        reference.fused_linear_kl(hs, ws, ht[:4], wt)
    with pytest.raises(ValueError, match=r"teacher_weight must have shape \(V, H\)"):
        reference.fused_linear_kl(hs, ws, ht, wt[0])
    with pytest.raises(ValueError, match="student_hidden must be a floating-point tensor"):
        reference.fused_linear_kl(hs.long(), ws, ht, wt)


def _trl_jsd():
    trl_gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    return trl_gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_trl_generalized_jsd(beta, temperature):
    jsd = _trl_jsd()
    g = torch.Generator().manual_seed(3)
    b, s, h, v = 2, 4, 6, 11
    hs = torch.randn(b, s, h, generator=g, dtype=torch.float64)
    ws = torch.randn(v, h, generator=g, dtype=torch.float64)
    ht = torch.randn(b, s, h, generator=g, dtype=torch.float64)
    wt = torch.randn(v, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, :2] = -100
    ours = reference.fused_linear_kl(
        hs, ws, ht, wt, divergence="jsd", beta=beta, temperature=temperature, mask=labels != -100, reduction="sum"
    )
    # TRL's "batchmean" with labels divides the summed per-token values by the number of counted tokens
    theirs = jsd(hs @ ws.T, ht @ wt.T, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
    assert ours.item() / (labels != -100).sum().item() == pytest.approx(theirs.item(), rel=1e-10)
    # without labels TRL's batchmean divides by the number of sequences (b), not tokens
    theirs_nolab = jsd(hs @ ws.T, ht @ wt.T, beta=beta, temperature=temperature, reduction="batchmean")
    ours_all = reference.fused_linear_kl(hs, ws, ht, wt, divergence="jsd", beta=beta, temperature=temperature,
                                         reduction="sum")
    assert ours_all.item() / b == pytest.approx(theirs_nolab.item(), rel=1e-10)


# ---- hard-label mixing ----------------------------------------------------------------------------


def test_hard_labels_equal_divergence_plus_weighted_cross_entropy():
    """loss = KL (at T, with T^2) + w * CE (torch's own cross_entropy at T = 1, mean over labelled tokens)."""
    g = torch.Generator().manual_seed(5)
    hs, ws, ht, wt = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 5, 4), (9, 4), (2, 5, 6), (9, 6)))
    labels = torch.randint(0, 9, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 0] = False
    opts = dict(divergence="forward_kl", temperature=2.0, temperature_sq_scaling=True, student_softcap=3.0, mask=mask)
    loss, stats = reference.fused_linear_kl(hs, ws, ht, wt, labels=labels, hard_weight=0.3, return_stats=True, **opts)
    soft = reference.fused_linear_kl(hs, ws, ht, wt, **opts)
    y = 3.0 * torch.tanh(hs @ ws.T / 3.0)  # temperature 1, softcap kept
    ce = torch.nn.functional.cross_entropy(y[mask], labels[mask], ignore_index=-100)  # mean over labelled
    torch.testing.assert_close(loss, soft + 0.3 * ce)
    torch.testing.assert_close(stats["soft_loss"], soft)
    torch.testing.assert_close(stats["hard_loss"], ce)
    per_token = torch.nn.functional.cross_entropy(y.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(stats["cross_entropy"], per_token * mask)


def test_hard_labels_reductions_and_num_items():
    g = torch.Generator().manual_seed(6)
    hs, ws, ht, wt = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 4), (7, 4), (6, 5), (7, 5)))
    labels = torch.tensor([0, 6, -1, 3, 2, -1])
    w = torch.rand(6, generator=g, dtype=torch.float64)
    common = dict(labels=labels, ignore_index=-1, token_weights=w, return_stats=True)
    none, s_none = reference.fused_linear_kl(hs, ws, ht, wt, reduction="none", hard_weight=2.0, **common)
    total, _ = reference.fused_linear_kl(hs, ws, ht, wt, reduction="sum", hard_weight=2.0, **common)
    torch.testing.assert_close(none.sum(), total)
    torch.testing.assert_close(none, s_none["soft_loss"] + 2.0 * s_none["hard_loss"])
    labelled = labels != -1
    mean, s_mean = reference.fused_linear_kl(hs, ws, ht, wt, reduction="mean", hard_weight=2.0, **common)
    torch.testing.assert_close(s_mean["hard_loss"], (w * s_none["cross_entropy"]).sum() / w[labelled].sum())
    torch.testing.assert_close(s_mean["soft_loss"], s_none["soft_loss"].sum() / w.sum())
    torch.testing.assert_close(mean, s_mean["soft_loss"] + 2.0 * s_mean["hard_loss"])
    items, _ = reference.fused_linear_kl(hs, ws, ht, wt, reduction="mean", hard_weight=2.0, num_items=10, **common)
    torch.testing.assert_close(items, total / 10)
    # labels given with hard_weight 0: the loss is the divergence alone, the stats still report the CE
    zero, s_zero = reference.fused_linear_kl(hs, ws, ht, wt, **common)
    torch.testing.assert_close(zero, s_zero["soft_loss"])
    assert bool((s_zero["cross_entropy"][labelled] > 0).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hard_weight=1.0), "hard_weight=1.0 needs labels"),
        (dict(labels=torch.zeros(3, dtype=torch.long), hard_weight=-1.0), "hard_weight must be a finite number >= 0"),
        (dict(labels=torch.zeros(3, 1, dtype=torch.long)), r"labels must have the leading shape \(3,\)"),
        (dict(labels=torch.zeros(2, dtype=torch.long)), r"labels must start with the leading shape \(3,\)"),
        (dict(labels=torch.zeros(3)), "labels must be an integer tensor"),
        (dict(labels=torch.tensor([0, 7, 1])), r"labels must be in \[0, 7\) .* or ignore_index=-100, got 7"),
        (dict(labels=torch.tensor([0, -5, 1])), "got -5"),
        (dict(labels=torch.zeros(3, dtype=torch.long), ignore_index=1.5), "ignore_index must be an int"),
    ],
)
def test_bad_labels_name_the_argument(kwargs, match):
    hs, ws, ht, wt = torch.randn(3, 4), torch.randn(7, 4), torch.randn(3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match=match):
        reference.fused_linear_kl(hs, ws, ht, wt, **kwargs)


def test_labels_of_masked_tokens_are_not_read():
    hs, ws, ht, wt = torch.randn(3, 4), torch.randn(7, 4), torch.randn(3, 4), torch.randn(7, 4)
    mask = torch.tensor([True, False, True])
    loss = reference.fused_linear_kl(hs, ws, ht, wt, labels=torch.tensor([1, 999, 2]), hard_weight=1.0, mask=mask)
    assert torch.isfinite(loss)
