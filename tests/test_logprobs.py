"""fused_linear_logprobs: values and gradients vs the materialized formulas, edge cases, bad input."""

import pytest
import torch

import opd_fast
from opd_fast import Tuning, reference
from opd_fast.core.dispatch import availability

SMALL = Tuning(chunk_tokens=3)  # several chunks even for tiny inputs


def _case(shape=(2, 5), h=6, v=23, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    ids = torch.randint(0, v, shape, generator=g)
    return hidden, weight, b, ids


def _direct(hidden, weight, bias, ids, temperature, scale, softcap):
    """log_softmax(z).gather and -sum q log q, written out independently of the package."""
    z = (hidden.double() @ weight.double().T + bias.double()) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_q = torch.log_softmax(z / temperature, -1)
    return log_q.gather(-1, ids[..., None]).squeeze(-1), -(log_q.exp() * log_q).sum(-1)


def _grads(outputs, upstream, inputs):
    return torch.autograd.grad(sum((o * u).sum() for o, u in zip(outputs, upstream, strict=True)), inputs)


@pytest.mark.parametrize(("temperature", "scale", "softcap"), [(1.0, 1.0, None), (0.7, 0.5, 3.0), (2.0, 1.3, None)])
def test_logprobs_and_entropy_match_direct_formula(temperature, scale, softcap):
    hidden, weight, bias, ids = _case()
    opts = dict(temperature=temperature, bias=bias, logit_scale=scale, softcap=softcap, return_entropy=True)
    out = opd_fast.fused_linear_logprobs(hidden, weight, ids, tuning=SMALL, **opts)
    expected = _direct(hidden, weight, bias, ids, temperature, scale, softcap)
    for got, want in zip(out, expected, strict=True):
        assert got.shape == ids.shape and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    upstream = [torch.randn(ids.shape, dtype=torch.float64) for _ in range(2)]  # e.g. importance weights
    for got, want in zip(_grads(out, upstream, (hidden, weight, bias)),
                         _grads(expected, upstream, (hidden, weight, bias)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    ref = reference.fused_linear_logprobs(hidden, weight, ids, **opts)
    for got, want in zip(out, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradient_of_one_output_alone():
    hidden, weight, bias, ids = _case(seed=1)
    lp, ent = opd_fast.fused_linear_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, tuning=SMALL)
    want_lp, want_ent = _direct(hidden, weight, bias, ids, 1.0, 1.0, None)
    for got, want in ((lp, want_lp), (ent, want_ent)):
        g = torch.autograd.grad(got.sum(), (hidden, weight, bias), retain_graph=True)
        e = torch.autograd.grad(want.sum(), (hidden, weight, bias), retain_graph=True)
        for a, b in zip(g, e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    plain = opd_fast.fused_linear_logprobs(hidden, weight, ids, bias=bias)
    torch.testing.assert_close(plain, want_lp, rtol=1e-10, atol=1e-10)


def test_minus_inf_logits_are_legal():
    hidden, weight, bias, ids = _case(shape=(9,), seed=3)
    bias = bias.detach().clone()
    bias[::3] = float("-inf")  # a vocabulary mask
    ids = torch.where(ids % 3 == 0, ids + 1, ids).clamp_max(weight.shape[0] - 1)
    lp, ent = opd_fast.fused_linear_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, tuning=SMALL)
    ref_lp, ref_ent = reference.fused_linear_logprobs(hidden, weight, ids, bias=bias, return_entropy=True)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    g_h, g_w = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    assert torch.isfinite(g_h).all() and torch.isfinite(g_w).all()


def test_single_sample_reverse_kl_estimator():
    """log q(y) - log p(y) with two heads: its mean is the sampled estimate of KL(q || p)."""
    hs, ws, _, ids = _case(shape=(4, 3), bias=False, seed=4)
    ht, wt, _, _ = _case(shape=(4, 3), h=8, bias=False, seed=5)
    with torch.no_grad():
        log_p = opd_fast.fused_linear_logprobs(ht, wt, ids)
    estimate = (opd_fast.fused_linear_logprobs(hs, ws, ids) - log_p).mean()
    want = (_direct(hs, ws, torch.zeros(()), ids, 1.0, 1.0, None)[0]
            - _direct(ht, wt, torch.zeros(()), ids, 1.0, 1.0, None)[0]).mean()
    torch.testing.assert_close(estimate, want)
    estimate.backward()
    assert hs.grad is not None and wt.grad is None


def test_no_grad_and_empty_inputs():
    hidden, weight, _, ids = _case(bias=False)
    with torch.no_grad():
        lp = opd_fast.fused_linear_logprobs(hidden, weight, ids)
    assert not lp.requires_grad
    empty = opd_fast.fused_linear_logprobs(hidden[:0], weight, ids[:0], return_entropy=True)
    assert empty[0].shape == (0, 5) and empty[1].shape == (0, 5)


def test_backend_choices():
    hidden, weight, _, ids = _case(bias=False)
    ref = opd_fast.fused_linear_logprobs(hidden, weight, ids, backend="reference")
    torch.testing.assert_close(opd_fast.fused_linear_logprobs(hidden, weight, ids, backend="torch"), ref)
    if availability("cpu", hidden.device)[0]:  # the native kernel on fp32 (float64 stays in torch)
        got = opd_fast.fused_linear_logprobs(hidden.float(), weight.float(), ids, backend="cpu")
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        opd_fast.fused_linear_logprobs(hidden, weight, ids, backend="gpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(token_ids=torch.full((2, 5), 23)), r"token_ids must be in \[0, 23\), got values in \[23, 23\]"),
        (dict(token_ids=torch.full((2, 5), -1)), r"token_ids must be in \[0, 23\)"),
        (dict(token_ids=torch.zeros(2, 5)), "token_ids must be an integer tensor, got dtype torch.float32"),
        (dict(token_ids=torch.zeros(2, 4, dtype=torch.long)), r"token_ids must start with the leading shape \(2, 5\)"),
        (dict(token_ids=torch.zeros(2, 5, 1, dtype=torch.long)), "token_ids must have the leading shape"),
        (dict(weight=torch.randn(23, 7, dtype=torch.float64)), r"hidden has hidden size 6 but weight has shape"),
        (dict(bias=torch.randn(22, dtype=torch.float64)), r"bias must have shape \(23,\)"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(softcap=-1.0), "softcap must be a finite number > 0"),
    ],
)
def test_bad_input_names_the_argument(change, message):
    hidden, weight, _, ids = _case(bias=False)
    args = dict(hidden=hidden, weight=weight, token_ids=ids) | change
    with pytest.raises(ValueError, match=message):
        opd_fast.fused_linear_logprobs(**args)
