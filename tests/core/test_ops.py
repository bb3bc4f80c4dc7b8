"""The custom ops equal the eager losses (values and student gradients), pass ``opcheck``, and a model
calling them compiles with ``fullgraph=True`` (no graph break) to the same loss and gradients."""

from __future__ import annotations

import pytest
import torch

import opd_fast
from opd_fast.core import ops

N, H, H_T, V = 6, 8, 10, 23


def _case(loss: str, per_token: bool, bias: bool):
    """(op, eager function, args, kwargs) of one loss, the student tensors first."""
    g = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=g)
    student = [rand(N, H), rand(V, H)]
    options = {"student_bias" if loss != "logprobs" else "bias": rand(V) if bias else None}
    if loss == "kl":
        args = (*student, rand(N, H_T), rand(V, H_T))
        options |= {"divergence": "jsd", "beta": 0.3, "mask": torch.arange(N) % 3 != 0, "temperature": 1.5}
    elif loss == "topk":
        logp, ids = rand(N, V).log_softmax(-1).topk(4, -1)
        args = (*student, ids, logp)
        options |= {"divergence": "reverse_kl", "tail": "bucket"}
    else:
        args = (*student, torch.randint(0, V, (N,), generator=g))
        options |= {"softcap": 4.0}
    if per_token and loss != "logprobs":
        options["reduction"] = "none"
    name = {"kl": "fused_linear_kl", "topk": "fused_linear_kl_topk", "logprobs": "fused_linear_logprobs"}[loss]
    return getattr(ops, name), getattr(opd_fast, name), args, options


def _value_and_grads(fn, args, options, upstream: torch.Tensor):
    leaves = [a.clone().requires_grad_(True) for a in args[:2]]
    bias_key = next(k for k in options if k.endswith("bias"))
    bias = None if options[bias_key] is None else options[bias_key].clone().requires_grad_(True)
    value = fn(*leaves, *args[2:], **{**options, bias_key: bias})
    (value * upstream).sum().backward()
    return value.detach(), [t.grad for t in (*leaves, bias) if t is not None]


CASES = [(loss, per_token, bias) for loss in ("kl", "topk", "logprobs") for per_token in (False, True)
         for bias in (False, True) if not (loss == "logprobs" and not per_token)]


@pytest.mark.parametrize(("loss", "per_token", "bias"), CASES)
def test_op_equals_eager(loss: str, per_token: bool, bias: bool) -> None:
    op, eager, args, options = _case(loss, per_token, bias)
    upstream = torch.rand(N) if per_token else torch.tensor(1.7)
    value, grads = _value_and_grads(op, args, options, upstream)
    expected, expected_grads = _value_and_grads(eager, args, options, upstream)
    torch.testing.assert_close(value, expected)
    assert len(grads) == len(expected_grads) == (3 if bias else 2)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("loss", ["kl", "topk", "logprobs"])
def test_opcheck(loss: str) -> None:
    _, eager, args, options = _case(loss, per_token=loss == "logprobs", bias=True)
    custom = getattr(ops, eager.__name__)
    inputs = custom.arguments(*args, **options)
    inputs[0], inputs[1] = (t.clone().requires_grad_(True) for t in inputs[:2])
    for fold in (True, False) if loss != "logprobs" else (False,):
        torch.library.opcheck(getattr(torch.ops.opd_fast, eager.__name__), (*inputs, fold),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_unsupported_argument_is_named() -> None:
    op, _, args, options = _case("kl", per_token=False, bias=False)
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['return_stats'\]"):
        op(*args, **options, return_stats=True)


class _Distiller(torch.nn.Module):
    """A student trunk and head distilled from a fixed teacher through the custom op."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.head = torch.nn.Linear(H, H), torch.nn.Linear(H, V)

    def forward(self, x: torch.Tensor, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.trunk(x))
        return ops.fused_linear_kl(hidden, self.head.weight, teacher_hidden, teacher_weight,
                                   student_bias=self.head.bias, divergence="reverse_kl", backend="cpu")


def test_compiles_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model, inputs = _Distiller(), (torch.randn(N, H), torch.randn(N, H_T), torch.randn(V, H_T))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        model.zero_grad()
        loss = fn(*inputs)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want)
