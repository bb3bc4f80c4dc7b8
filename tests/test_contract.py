"""The loss contract, once: every loss x backend x dtype x feature against the float64 reference.

Each case builds seeded inputs for one feature, calls the public function on one backend and on
``backend="reference"``, and compares the value, every student gradient (of a random weighting of
per-token outputs) and the statistics at the dtype's tolerance. Backend-specific properties (ISA
variants, thread determinism, chunk regimes, compile checks) live in ``tests/backends/``.

The Triton backend runs here under ``TRITON_INTERPRET=1`` on CPU tensors (fp32 and fp16: ``tl.dot``
on bf16 is wrong in the interpreter, bf16 is proven by the compile check).
"""

from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import dataclass, field

import pytest
import torch

import opd_fast
from opd_fast import Tuning, available_backends

LOSSES = ("kl", "topk_bucket", "topk_renormalize", "logprobs")
DIVERGENCES = (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5))
TOL = {
    torch.float64: dict(rtol=1e-8, atol=1e-10),
    torch.float32: dict(rtol=2e-4, atol=1e-4),
    torch.float16: dict(rtol=3e-2, atol=3e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=1e-2),
}
SMALL = Tuning(chunk_tokens=4)  # several token chunks even at these sizes


def _backends() -> list[str]:
    usable = [name for name, why in available_backends("cpu").items() if not why and name != "reference"]
    if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        usable = [b for b in usable if b != "triton"]
    return usable


def _dtypes(backend: str) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.float16) if backend == "triton" else (torch.float64, torch.float32, torch.bfloat16)


@dataclass
class Case:
    """Shapes and options of one feature; ``options`` go to the public function as they are."""

    n: tuple[int, ...] = (2, 7)  # leading shape
    h_s: int = 12
    h_t: int = 20
    v: int = 37
    v_t: int | None = None  # teacher vocabulary when it differs (padded heads, with vocab_size)
    k: int = 5
    spread: float = 1.0  # scale of the hidden states (extreme logits)
    bias: bool = False
    neg_inf_columns: tuple[int, ...] = ()  # vocabulary entries with -inf logits on both sides
    mask: str | None = None  # None | "some" | "all"
    weights: bool = False
    labels: bool = False
    pad_topk: bool = False  # top-k rows with padding slots (id -1, garbage log-prob) and one empty row
    teacher_lse: bool = False  # pass the teacher's true per-token log-sum-exp (teacher_lse=) back in
    options: dict = field(default_factory=dict)


FEATURES = {
    "plain": Case(),
    "odd_single_token": Case(n=(1,), h_s=3, h_t=5, v=5, k=2),
    "odd_many_tokens": Case(n=(37,), h_s=1, h_t=2, v=3, k=3),
    "masks_weights_mean": Case(mask="some", weights=True),
    "masks_sum": Case(mask="some", options=dict(reduction="sum")),
    "masks_none": Case(mask="some", weights=True, options=dict(reduction="none")),
    "num_items": Case(mask="some", options=dict(num_items=9.0)),
    "all_masked": Case(mask="all"),
    "heads_T_scale_softcap_bias": Case(bias=True, options=dict(temperature=1.7, student_logit_scale=0.8,
                                                                student_softcap=6.0)),
    "temperature_sq_scaling": Case(options=dict(temperature=0.7, temperature_sq_scaling=True)),
    "neg_inf_logits": Case(bias=True, neg_inf_columns=(3, 11, 12)),
    "extreme_logits": Case(spread=25.0),
    "vocab_size_padded_heads": Case(v=37, v_t=45, options=dict(vocab_size=33)),
    "topk_padding": Case(pad_topk=True, mask="some"),
    "hard_labels": Case(mask="some", labels=True, options=dict(hard_weight=0.6)),
    "hard_labels_T_none": Case(labels=True, options=dict(hard_weight=0.4, temperature=1.6, reduction="none")),
    # Narrow vocabulary chunks: the chunked backends' 2-D regime, several Triton gradient stripes.
    "vocab_tiles": Case(bias=True, options=dict(temperature=1.3, tuning=Tuning(chunk_tokens=4, chunk_vocab=16))),
    "teacher_lse": Case(bias=True, mask="some", labels=True, teacher_lse=True,
                        options=dict(temperature=1.7, student_softcap=6.0, hard_weight=0.5)),
    "teacher_lse_vocab_tiles": Case(mask="some", weights=True, teacher_lse=True,
                                    options=dict(tuning=Tuning(chunk_tokens=4, chunk_vocab=16))),
    # The Triton backend's cached mode (``_ONLY_ON``: the other backends ignore triton_mode).
    "triton_cached": Case(mask="some", weights=True, options=dict(tuning=Tuning(chunk_tokens=4, triton_mode="cached"))),
    "triton_cached_heads_labels": Case(bias=True, labels=True, neg_inf_columns=(3, 11), options=dict(
        temperature=1.7, student_softcap=6.0, hard_weight=0.5, tuning=Tuning(chunk_tokens=4, triton_mode="cached"))),
}
# bf16 GEMMs round logits of magnitude ~100 by ~0.5, which moves the softmax itself: there the
# contract is only that nothing overflows (finite where the reference is finite).
_FINITE_ONLY = {("extreme_logits", torch.bfloat16)}
# Options that do not exist for a loss: the feature is not part of its contract.
_NOT_FOR = {
    "kl": {"topk_padding"},
    "topk": {"hard_labels", "hard_labels_T_none", "teacher_lse", "teacher_lse_vocab_tiles", "triton_cached",
             "triton_cached_heads_labels"},
    "logprobs": {"topk_padding", "masks_weights_mean", "masks_sum", "masks_none", "num_items", "all_masked",
                 "temperature_sq_scaling", "vocab_size_padded_heads", "hard_labels", "hard_labels_T_none",
                 "teacher_lse", "teacher_lse_vocab_tiles", "triton_cached", "triton_cached_heads_labels"},
}


# Features of one backend's own options, run on that backend only.
_ONLY_ON = {"triton_cached": "triton", "triton_cached_heads_labels": "triton"}


def _teacher_options(options: dict, loss: str) -> dict:
    """The teacher's head options for the two-head loss, mirrored from the student's."""
    extra = {}
    if loss == "kl":
        for name in ("logit_scale", "softcap"):
            if f"student_{name}" in options:
                extra[f"teacher_{name}"] = options[f"student_{name}"] * 1.3
    return extra


def _inputs(case: Case, loss: str, dtype: torch.dtype, seed: int) -> tuple[list, dict, dict]:
    """Positional tensors and keyword arguments of the public call (``backend`` excluded), and the student leaves."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * s)
    leaves = dict(
        hidden=rand(*case.n, case.h_s, s=case.spread), weight=rand(case.v, case.h_s, s=0.5),
        bias=rand(case.v) if case.bias else None,
    )
    if case.neg_inf_columns:
        leaves["bias"][list(case.neg_inf_columns)] = float("-inf")
    leaves = {k: None if t is None else t.to(dtype).requires_grad_() for k, t in leaves.items()}
    options = dict(case.options)
    if case.mask is not None:
        some = torch.rand(case.n, generator=g) > 0.3
        options["mask"] = some if case.mask == "some" else torch.zeros(case.n, dtype=torch.bool)
    if case.weights:
        options["token_weights"] = torch.rand(case.n, generator=g, dtype=torch.float64).to(dtype) + 0.1
    vocab = options.get("vocab_size", case.v)
    allowed = torch.tensor([c for c in range(vocab) if c not in case.neg_inf_columns])
    if loss == "logprobs":
        ids = allowed[torch.randint(0, len(allowed), case.n, generator=g)]
        renamed = {"student_logit_scale": "logit_scale", "student_softcap": "softcap"}
        options = {renamed.get(k, k): v for k, v in options.items()}
        return [leaves["hidden"], leaves["weight"], ids], {"bias": leaves["bias"], **options}, leaves
    if loss == "kl":
        v_t = case.v_t or case.v
        teacher_bias = rand(v_t)
        if case.neg_inf_columns:
            teacher_bias[list(case.neg_inf_columns)] = float("-inf")
        teacher = [rand(*case.n, case.h_t, s=case.spread).to(dtype), rand(v_t, case.h_t, s=0.5).to(dtype)]
        options.update(teacher_bias=teacher_bias.to(dtype) if case.bias else None, **_teacher_options(options, loss))
        if case.labels:
            labels = torch.randint(0, vocab, case.n, generator=g)
            labels[torch.rand(case.n, generator=g) < 0.25] = -100
            options["labels"] = labels
        args = [leaves["hidden"], leaves["weight"], *teacher]
    else:  # top-k teacher: the k most likely of a random distribution over the allowed columns
        k = min(case.k, len(allowed))
        logits = torch.randn(*case.n, len(allowed), generator=g, dtype=torch.float64) * 2.0
        log_p, top = torch.log_softmax(logits, -1).topk(k, -1)
        ids = allowed[top]
        if case.pad_topk:
            flat_ids, flat_lp = ids.view(-1, k), log_p.view(-1, k)
            flat_ids[0, 2:], flat_lp[0, 2:] = -1, float("nan")
            flat_ids[3, 1], flat_lp[3, 1] = -1, 0.0
            flat_ids[4], flat_lp[4] = -1, -3.0
        args = [leaves["hidden"], leaves["weight"], ids, log_p.to(dtype)]
        options["tail"] = loss.removeprefix("topk_")
    return args, {"student_bias": leaves["bias"], **options}, leaves


# The interpreter is slow (~0.5 s a case): Triton runs every feature in fp32 with one divergence
# each (rotating), every divergence on the features below, and fp16 on those features only.
_TRITON_FULL = ("plain", "heads_T_scale_softcap_bias", "masks_weights_mean", "hard_labels", "neg_inf_logits",
                "teacher_lse", "teacher_lse_vocab_tiles", "triton_cached", "triton_cached_heads_labels")


# Measured gaps, kept visible: the Triton single-head sweep computes the full-vocabulary entropy as
# the ids' terms plus w (E_tail[z] - lse); on near-one-hot rows that difference cancels in fp32
# (1e-4 absolute on an entropy of 4e-4). Only the ``student_entropy`` statistic is affected.
_KNOWN_GAPS = {
    ("triton", "topk_renormalize", "extreme_logits"): pytest.mark.xfail(
        reason="Triton tail entropy cancels on near-one-hot rows (stat only)", strict=False),
}


def _divergences(backend: str, loss: str, feature: str, dtype: torch.dtype) -> list[tuple[str, float]]:
    if loss == "logprobs":
        return [("-", 0.0)]
    if backend != "triton" or feature in _TRITON_FULL:
        return list(DIVERGENCES)
    if dtype != torch.float32:
        return []
    return [DIVERGENCES[list(FEATURES).index(feature) % len(DIVERGENCES)]]


def _matrix() -> list:
    params = []
    for backend in _backends():
        for loss in LOSSES:
            for feature in FEATURES:
                if feature in _NOT_FOR.get(loss.split("_")[0], ()) or _ONLY_ON.get(feature, backend) != backend:
                    continue
                for dtype in _dtypes(backend):
                    if backend == "triton" and dtype != torch.float32 and feature not in _TRITON_FULL:
                        continue
                    for divergence, beta in _divergences(backend, loss, feature, dtype):
                        marks = _KNOWN_GAPS.get((backend, loss, feature), ())
                        params.append(pytest.param(backend, loss, feature, dtype, divergence, beta, marks=marks,
                                                   id=f"{backend}-{loss}-{feature}-{str(dtype)[6:]}-{divergence}"))
    return params


def _call(loss: str, backend: str, args: list, kwargs: dict):
    fns = {"kl": opd_fast.fused_linear_kl, "logprobs": opd_fast.fused_linear_logprobs}
    fn = fns.get(loss, opd_fast.fused_linear_kl_topk)
    if loss == "logprobs":
        return fn(*args, backend=backend, return_entropy=True, **kwargs)
    tuning = {} if backend == "reference" or "tuning" in kwargs else dict(tuning=SMALL)
    return fn(*args, backend=backend, return_stats=True, **kwargs, **tuning)


def _check(got: torch.Tensor, want: torch.Tensor, tol: dict | None, what: str) -> None:
    """Close at ``tol`` relative to the largest entry (a mean's gradients are small), and non-finite alike."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{what}: non-finite entries differ"
    if tol is None:
        return
    finite = torch.isfinite(want)
    scale = want[finite].abs().max().clamp_min(1.0) if finite.any() else 1.0
    torch.testing.assert_close(got[finite] / scale, want[finite] / scale, **tol, msg=what)


@pytest.mark.parametrize(("backend", "loss", "feature", "dtype", "divergence", "beta"), _matrix())
def test_contract(backend, loss, feature, dtype, divergence, beta):
    case = FEATURES[feature]
    args, kwargs, leaves = _inputs(case, loss, dtype, seed=zlib.crc32(f"{loss}/{feature}".encode()))
    if loss != "logprobs":
        kwargs.update(divergence=divergence, beta=beta)
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter's masked lanes: inf - inf
    if case.teacher_lse:  # the true LSE, as return_stats gives it: every backend must match the call without it
        kwargs["teacher_lse"] = _call(loss, "reference", args, kwargs)[1]["teacher_lse"].detach()
    (out, stats), (ref, ref_stats) = (_call(loss, b, args, kwargs) for b in (backend, "reference"))
    if loss == "logprobs":
        stats, ref_stats = {"entropy": stats}, {"entropy": ref_stats}
    tol = None if (feature, dtype) in _FINITE_ONLY else TOL[dtype]
    _check(out, ref, tol, "value")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, want in ref_stats.items():
        _check(stats[name], want, tol, name)
    differentiable = [t for t in leaves.values() if t is not None]
    upstream = torch.rand(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
    outputs = [(out, ref)] + ([(stats["entropy"], ref_stats["entropy"])] if loss == "logprobs" else [])
    got = torch.autograd.grad(sum((o * upstream.to(o.dtype)).sum() for o, _ in outputs), differentiable)
    want = torch.autograd.grad(sum((r * upstream).sum() for _, r in outputs), differentiable)
    for name, g, w in zip((k for k, t in leaves.items() if t is not None), got, want, strict=True):
        assert g.dtype == dtype, f"grad of {name} is {g.dtype}"
        _check(g, w, tol, f"grad {name}")
