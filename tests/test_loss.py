"""Public API: dispatch, module wrapper, input handling beyond the reference's validation."""

import pytest
import torch

import opd_fast
from opd_fast.core.dispatch import resolve


def _case(n=6, h=5, v=13, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True),
        torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True),
        torch.randn(n, h + 1, generator=g, dtype=dtype),
        torch.randn(v, h + 1, generator=g, dtype=dtype),
    )


def test_auto_resolves_to_a_cpu_backend_and_unknown_backend_errors():
    assert resolve("auto", torch.device("cpu")) in ("cpu", "torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        opd_fast.fused_linear_kl(*_case(), backend="cuda-magic")


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # without the interpreter, CPU tensors cannot run Triton
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable: Triton kernels need CUDA tensors"):
        opd_fast.fused_linear_kl(*_case(), backend="triton")


def test_available_backends_reports_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    avail = opd_fast.available_backends("cpu")
    assert avail["torch"] == "" and avail["reference"] == ""
    assert "CUDA" in avail["triton"]


def test_module_holds_options_and_rejects_typos():
    hs, ws, ht, wt = _case()
    module = opd_fast.FusedLinearKL(divergence="reverse_kl", temperature=2.0, backend="torch")
    expected = opd_fast.fused_linear_kl(hs, ws, ht, wt, divergence="reverse_kl", temperature=2.0, backend="torch")
    torch.testing.assert_close(module(hs, ws, ht, wt), expected)
    assert "reverse_kl" in repr(module)
    with pytest.raises(TypeError, match="unknown option"):
        opd_fast.FusedLinearKL(temprature=2.0)


def test_non_contiguous_inputs_are_handled():
    _, ws, ht, wt = _case(n=8)
    hs_nc = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).T.requires_grad_()  # (8, 5) transposed
    ws_nc = ws.detach().T.contiguous().T.requires_grad_()
    assert not hs_nc.is_contiguous()
    loss = opd_fast.fused_linear_kl(hs_nc, ws_nc, ht[:, :6], wt, backend="torch")
    loss.backward()
    ref = opd_fast.fused_linear_kl(hs_nc.detach().contiguous(), ws.detach(), ht[:, :6], wt, backend="reference")
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    assert hs_nc.grad.shape == hs_nc.shape


def test_teacher_requiring_grad_is_a_constant():
    hs, ws, ht, wt = _case()
    ht.requires_grad_()
    wt.requires_grad_()
    opd_fast.fused_linear_kl(hs, ws, ht, wt, backend="torch").backward()
    assert ht.grad is None and wt.grad is None
    assert hs.grad is not None


def test_integer_and_device_errors_name_the_argument():
    hs, ws, ht, wt = _case()
    with pytest.raises(ValueError, match="teacher_weight must be a floating-point tensor.*int64"):
        opd_fast.fused_linear_kl(hs, ws, ht, wt.long())
    with pytest.raises(ValueError, match="all tensors must be on one device.*teacher_weight on meta"):
        opd_fast.fused_linear_kl(hs, ws, ht, wt.to("meta"))


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_mixed_precision_head_follows_the_hidden_states(backend):
    """bf16 activations with an fp32 master LM head (HF bf16 training): the head is cast once, its
    gradient arrives in fp32 and equals the all-bf16 call's; the teacher's head likewise."""
    if backend == "cpu" and opd_fast.available_backends()["cpu"]:
        pytest.skip(opd_fast.available_backends()["cpu"])
    hs, ws, ht, wt = _case()
    hs = hs.detach().bfloat16().requires_grad_()
    ws32 = ws.detach().float().requires_grad_()
    ws16 = ws.detach().bfloat16().requires_grad_()
    mixed = opd_fast.fused_linear_kl(hs, ws32, ht.bfloat16(), wt.float(), backend=backend)
    mixed.backward()
    grad_h, hs.grad = hs.grad, None
    plain = opd_fast.fused_linear_kl(hs, ws16, ht.bfloat16(), wt.bfloat16(), backend=backend)
    plain.backward()
    assert ws32.grad.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
    torch.testing.assert_close(ws32.grad, ws16.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(grad_h, hs.grad, rtol=0, atol=0)


def test_autocast_sets_the_compute_dtype():
    hs, ws, ht, wt = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = opd_fast.fused_linear_kl(hs, ws, ht, wt, backend="torch")
    plain = opd_fast.fused_linear_kl(hs.bfloat16(), ws.bfloat16(), ht.bfloat16(), wt.bfloat16(), backend="torch")
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)
    auto.backward()
    assert ws.grad.dtype == torch.float32 and torch.isfinite(ws.grad).all()


def test_num_items_scales_mean_for_gradient_accumulation():
    hs, ws, ht, wt = _case(n=8)
    full = opd_fast.fused_linear_kl(hs, ws, ht, wt, backend="torch", reduction="sum") / 8
    halves = sum(
        opd_fast.fused_linear_kl(hs[i : i + 4], ws, ht[i : i + 4], wt, backend="torch", num_items=8) for i in (0, 4)
    )
    torch.testing.assert_close(halves, full)


def test_return_stats_shapes_follow_leading_shape():
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    ws = torch.randn(7, 4, generator=g)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    _, stats = opd_fast.fused_linear_kl(hs, ws, hs.detach(), ws, mask=mask, return_stats=True, backend="torch")
    assert set(stats) == {"divergence", "student_lse", "teacher_lse", "student_entropy"}
    for value in stats.values():
        assert value.shape == (2, 3) and not value.requires_grad
        assert torch.equal(value[~mask], torch.zeros(2))
    assert (stats["student_entropy"][mask] > 0).all()
