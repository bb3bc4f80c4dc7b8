import torch

from opd_fast.benchmarking.inputs import LOGIT_STD, make_inputs
from opd_fast.benchmarking.shapes import Shape


def test_inputs_are_reproducible_fresh_per_case_and_never_zero():
    shape = Shape(64, 512, 32, 32)
    a, b = make_inputs(shape, "fp32", seed=3), make_inputs(shape, "fp32", seed=3)
    assert torch.equal(a.hs, b.hs) and torch.equal(a.wt, b.wt)
    other = make_inputs(Shape(64, 512, 32, 48), "fp32", seed=3)
    assert not torch.equal(a.hs, other.hs)  # a different case draws different inputs
    assert not torch.equal(a.hs, make_inputs(shape, "fp32", seed=4).hs)
    for t in (a.hs, a.ws, a.ht, a.wt):
        assert t.abs().min() > 0 or (t != 0).float().mean() > 0.999
    assert a.hs.requires_grad and a.ws.requires_grad and not a.ht.requires_grad


def test_logits_look_like_a_trained_lm_and_the_teacher_roughly_agrees():
    x = make_inputs(Shape(256, 4096, 64, 96), "fp32", seed=0)
    s, t = x.hs @ x.ws.T, x.ht @ x.wt.T
    assert abs(s.std().item() - LOGIT_STD) < 0.3 and abs(t.std().item() - LOGIT_STD) < 0.3
    corr = torch.corrcoef(torch.stack([s.flatten(), t.flatten()]))[0, 1]
    assert 0.4 < corr < 0.95
    assert x.ht.shape == (256, 96)


def test_dtype_and_row_subset():
    x = make_inputs(Shape(32, 128, 16, 16), "bf16", seed=0)
    assert x.hs.dtype == x.wt.dtype == torch.bfloat16
    sub = x.rows(8)
    assert sub.hs.shape == (8, 16) and sub.hs.is_leaf and sub.ws.is_leaf and sub.ws.requires_grad
    assert torch.equal(sub.hs, x.hs[:8])
