"""The k-sparse path of tail="renormalize" (no stats): only the k id logits, against the reference."""

import pytest
import torch

import opd_fast
from opd_fast import Tuning, reference

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _case(dtype=torch.float64, n=13, h=8, v=41, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype)
    student = (t(n, h).requires_grad_(), t(v, h, scale=0.7).requires_grad_(), t(v).requires_grad_())
    full = torch.log_softmax(2.0 * torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    log_p, ids = full.topk(k, -1)
    ids, log_p = ids.clone(), log_p.clone()
    ids[0, 2:], log_p[0, 2:] = -1, 0.0  # padding slots
    ids[3], log_p[3] = -1, -3.0  # an all-padding row
    return student, ids, log_p


def _run(fn, student, ids, log_p, upstream, **opts):
    hidden, weight, bias = student
    out = fn(hidden, weight, ids, log_p, student_bias=bias, tail="renormalize", **opts)
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), student)
    return out.double(), [g.double() for g in grads]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference_fp64(divergence, reduction):
    student, ids, log_p = _case(seed=hash((divergence, reduction)) % 100)
    mask = torch.ones(13, dtype=torch.bool)
    mask[5] = False
    opts = dict(divergence=divergence, beta=0.3, reduction=reduction, mask=mask, temperature=1.4,
                student_softcap=5.0, student_logit_scale=0.8)
    upstream = torch.randn(13 if reduction == "none" else (), dtype=torch.float64)
    got = _run(opd_fast.fused_linear_kl_topk, student, ids, log_p, upstream, tuning=Tuning(memory_budget_mb=0.001),
               **opts)
    want = _run(reference.fused_linear_kl_topk, student, ids, log_p, upstream, **opts)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-11)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_equals_the_vocabulary_sweep(dtype, tol):
    """Same loss and gradients as the full sweep (which return_stats forces) in low precision."""
    student, ids, log_p = _case(dtype=dtype, seed=4)
    upstream = torch.tensor(1.0)
    sparse = _run(opd_fast.fused_linear_kl_topk, student, ids, log_p, upstream, divergence="reverse_kl",
                  backend="torch")
    sweep_fn = lambda *a, **kw: opd_fast.fused_linear_kl_topk(*a, **kw, return_stats=True)[0]
    sweep = _run(sweep_fn, student, ids, log_p, upstream, divergence="reverse_kl", backend="torch")
    torch.testing.assert_close(sparse[0], sweep[0], rtol=tol, atol=tol)
    for a, b in zip(sparse[1], sweep[1], strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_no_gradients_wanted_and_empty_batch():
    (hidden, weight, _), ids, log_p = _case()
    with torch.no_grad():
        loss = opd_fast.fused_linear_kl_topk(hidden, weight, ids, log_p, tail="renormalize", reduction="sum")
    want = reference.fused_linear_kl_topk(hidden, weight, ids, log_p, tail="renormalize", reduction="sum")
    torch.testing.assert_close(loss, want)
    empty = opd_fast.fused_linear_kl_topk(hidden[:0], weight, ids[:0], log_p[:0], tail="renormalize")
    assert empty.item() == 0.0
