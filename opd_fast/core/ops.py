"""The fused losses as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` traces them.

Dynamo cannot trace the losses' Python (validation with data-dependent checks, the autograd
Function, native and Triton launches), so without ops a compiled model breaks its graph at every
loss call. Each loss here is two opaque ops with fake (meta) implementations that give the output
shapes, and an autograd formula registered on the first:

* ``opd_fast::<loss>`` returns the value and, when ``fold_grads``, the student's gradients
  (hidden, weight, bias) computed in the same sweep, which is how the eager scalar losses work
  (backward then only scales them);
* ``opd_fast::<loss>_vjp`` recomputes the value and returns its vector-Jacobian product with the
  incoming gradient: the backward of per-token outputs (``reduction="none"``, log-probs), whose
  gradient is unknown during the forward.

The op schemas are read from the public functions' signatures (the arguments are written once, in
``loss.py``, ``topk.py`` and ``logprobs.py``), minus what an op cannot carry: statistics
(``return_stats`` / ``return_entropy``: the ops return the value only), ``tuning`` (the defaults) and
``process_group``. ``num_items`` must be a Python number (a tensor would be a graph break).
"""

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..logprobs import fused_linear_logprobs
from ..loss import fused_linear_kl
from ..topk import fused_linear_kl_topk
from .engine import accum_dtype

__all__ = ["fused_linear_kl", "fused_linear_kl_topk", "fused_linear_logprobs"]

_NOT_IN_OPS = ("return_stats", "return_entropy", "tuning", "process_group")
_SCHEMA_TYPES = {  # public annotation -> schema type
    "torch.Tensor": "Tensor", "torch.Tensor | None": "Tensor?", "float": "float", "float | None": "float?",
    "float | torch.Tensor | None": "float?", "int": "int", "int | None": "int?", "str": "str", "bool": "bool",
}
_OpValues = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class _LossOp:
    """One public loss as a pair of custom ops; ``student`` names its differentiable tensors (hidden, weight, bias)."""

    loss: Callable[..., torch.Tensor]
    student: tuple[str, str, str]

    @property
    def name(self) -> str:
        return self.loss.__name__

    @property
    def params(self) -> list[inspect.Parameter]:
        return [p for p in inspect.signature(self.loss).parameters.values() if p.name not in _NOT_IN_OPS]

    def schema_args(self) -> str:
        unknown = [f"{p.name}: {p.annotation}" for p in self.params if str(p.annotation) not in _SCHEMA_TYPES]
        if unknown:
            raise TypeError(f"opd_fast.ops: no op schema type for {self.name}'s argument(s) {unknown}; "
                            "map the annotation in _SCHEMA_TYPES or list the argument in _NOT_IN_OPS")
        return ", ".join(f"{_SCHEMA_TYPES[str(p.annotation)]} {p.name}" for p in self.params)

    def per_token(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("reduction", "none") == "none"

    def value_shape(self, kwargs: dict[str, Any]) -> tuple[int, ...]:
        return tuple(kwargs[self.student[0]].shape[:-1]) if self.per_token(kwargs) else ()


@contextlib.contextmanager
def _autograd_in_kernel() -> Iterator[None]:
    """Autograd inside an op's kernel, where the dispatcher has switched it off.

    The kernels differentiate the public loss (its ``FusedLoss`` folds the gradients into the forward
    sweep), but the dispatcher runs kernels with the autograd keys excluded, so views made inside
    would lose their graph. This restores the dispatch state a plain call has (a private torch API;
    the custom-op tests compare every gradient with the eager loss, so a change in it fails them).
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _student_leaves(op: _LossOp, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the student tensors replaced by fresh leaves that require grad."""
    return {**kwargs, **{k: kwargs[k].detach().requires_grad_(True) for k in op.student if kwargs[k] is not None}}


def _grads(op: _LossOp, leaves: dict[str, Any], value: torch.Tensor, upstream: torch.Tensor | None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student gradients of ``value`` (an empty tensor stands for an absent bias: ops return tensors)."""
    present = [leaves[k] for k in op.student if leaves[k] is not None]
    grads = iter(torch.autograd.grad(value, present, upstream, allow_unused=True, materialize_grads=True))
    out = [next(grads) if leaves[k] is not None else leaves[op.student[0]].new_empty(0) for k in op.student]
    return out[0], out[1], out[2]


def _register(op: _LossOp) -> "CustomLoss":
    names = [p.name for p in op.params]
    args = op.schema_args()

    # one kernel for every device: the public function dispatches to its backend
    @torch.library.custom_op(f"opd_fast::{op.name}", mutates_args=(),
                             schema=f"({args}, bool fold_grads) -> (Tensor, Tensor, Tensor, Tensor)")
    def forward(*args: Any) -> _OpValues:
        kwargs, fold = dict(zip(names, args, strict=False)), args[-1]
        if not fold:
            with torch.no_grad():
                value = op.loss(**kwargs)
            return value, value.new_empty(0), value.new_empty(0), value.new_empty(0)
        leaves = _student_leaves(op, kwargs)
        with _autograd_in_kernel():
            value = op.loss(**leaves)
            return (value.detach(), *_grads(op, leaves, value, None))

    @torch.library.custom_op(f"opd_fast::{op.name}_vjp", mutates_args=(),
                             schema=f"({args}, Tensor upstream) -> (Tensor, Tensor, Tensor)")
    def vjp(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        leaves = _student_leaves(op, dict(zip(names, args, strict=False)))
        with _autograd_in_kernel():
            return _grads(op, leaves, op.loss(**leaves), args[-1])

    def _fake_grads(kwargs: dict[str, Any], fold: bool = True) -> tuple[torch.Tensor, ...]:
        return tuple(kwargs[k].new_empty(kwargs[k].shape if fold else 0) if kwargs[k] is not None
                     else kwargs[op.student[0]].new_empty(0) for k in op.student)

    @forward.register_fake
    def _forward_fake(*args: Any) -> _OpValues:
        kwargs = dict(zip(names, args, strict=False))
        hidden = kwargs[op.student[0]]
        value = hidden.new_empty(op.value_shape(kwargs), dtype=accum_dtype(hidden.dtype))
        return (value, *_fake_grads(kwargs, args[-1]))

    @vjp.register_fake
    def _vjp_fake(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _fake_grads(dict(zip(names, args, strict=False)))

    def setup_context(ctx, inputs: tuple, output: _OpValues) -> None:
        ctx.folded = inputs[-1]
        ctx.present = [i for i, n in enumerate(names) if n in op.student and inputs[i] is not None]
        if ctx.folded:  # backward scales the gradients the forward sweep computed
            ctx.save_for_backward(*output[1:])
            return
        ctx.tensor_slots = [i for i, x in enumerate(inputs[:-1]) if isinstance(x, torch.Tensor)]
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in inputs[:-1]]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots))

    def backward(ctx, upstream: torch.Tensor, *_: torch.Tensor) -> tuple:
        if ctx.folded:
            grads = [g * upstream.to(g.dtype) for g in ctx.saved_tensors]
        else:
            inputs = list(ctx.others)
            for i, t in zip(ctx.tensor_slots, ctx.saved_tensors, strict=True):
                inputs[i] = t
            grads = vjp(*inputs, upstream)
        by_name = dict(zip(op.student, grads, strict=True))
        return (*(by_name[n] if i in ctx.present else None for i, n in enumerate(names)), None)

    forward.register_autograd(backward, setup_context=setup_context)
    return CustomLoss(op, forward)


class CustomLoss:
    """A public loss through its custom op: same arguments (minus statistics, tuning, process_group), the value."""

    def __init__(self, op: _LossOp, forward: Callable[..., _OpValues]) -> None:
        self.op, self.forward = op, forward
        self.defaults = {p.name: p.default for p in op.params}
        self.positional = [p.name for p in op.params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        self.__name__ = op.name
        self.__doc__ = f"``opd_fast.{op.name}`` as a custom op (the value only; see ``opd_fast.core.ops``)."

    def arguments(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The op's arguments for a call of the public function (``fold_grads`` excluded)."""
        unknown = set(kwargs) - set(self.defaults)
        if unknown:
            raise TypeError(f"opd_fast.ops.{self.op.name} got unsupported argument(s) {sorted(unknown)}: statistics, "
                            f"tuning and process_group need the eager opd_fast.{self.op.name}")
        values = {**self.defaults, **dict(zip(self.positional, args, strict=False)), **kwargs}
        return [values[n] for n in self.defaults]

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        values = dict(zip(self.defaults, self.arguments(*args, **kwargs), strict=True))
        student = [values[k] for k in self.op.student if values[k] is not None]
        fold = torch.is_grad_enabled() and any(t.requires_grad for t in student) and not self.op.per_token(values)
        return self.forward(*values.values(), fold)[0]


fused_linear_kl = _register(_LossOp(fused_linear_kl, ("student_hidden", "student_weight", "student_bias")))
fused_linear_kl_topk = _register(_LossOp(fused_linear_kl_topk, ("student_hidden", "student_weight", "student_bias")))
fused_linear_logprobs = _register(_LossOp(fused_linear_logprobs, ("hidden", "weight", "bias")))
