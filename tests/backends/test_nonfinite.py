"""The non-finite contract of every backend, for every divergence, signal and dtype.

A NaN or an infinity in the inputs of a counted row reaches that row's value, the loss and the
gradients (so a trainer's skip-step guard sees it); the other rows stay finite, and masked rows
are never computed at all. ``-inf`` *logits* are legal (zero mass) and covered elsewhere; here the
non-finite values sit in hidden states or biases, where they are never legal. fp16 logits beyond
65504 overflow in the fp16 GEMM: the loss is then right or non-finite, never a plausible number.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import opd_fast
from opd_fast.core.dispatch import availability

CPU = torch.device("cpu")
# Triton (the interpreter on CPU tensors) has its own fp32 cases below: its bf16 tl.dot is wrong there.
BACKENDS = [b for b in ("reference", "torch", "cpu") if availability(b, CPU)[0]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)]
N, H_S, H_T, V, K = 7, 8, 6, 37, 5
NAN, INF = float("nan"), float("inf")
# counted row -> (side, value) of the poison put into its hidden state; rows 0 and 6 stay clean
KL_POISON = {1: ("student", NAN), 2: ("teacher", NAN), 3: ("student", INF), 4: ("teacher", -INF)}
STUDENT_POISON = {1: ("student", NAN), 3: ("student", INF), 4: ("student", -INF)}
MASKED_ROW = 5  # NaN on both sides, masked out: must change nothing


def _tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return dict(student_hidden=t(N, H_S), student_weight=t(V, H_S), student_bias=t(V),
                teacher_hidden=t(N, H_T), teacher_weight=t(V, H_T))


def _poison(tensors: dict[str, torch.Tensor], rows: dict[int, tuple[str, float]]) -> None:
    for row, (side, value) in rows.items():
        tensors[f"{side}_hidden"][row, 1] = value
    tensors["student_hidden"][MASKED_ROW, 2] = NAN
    tensors["teacher_hidden"][MASKED_ROW, 2] = NAN


def _topk(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    return ids, torch.log_softmax(torch.randn(N, V, generator=g), -1).gather(1, ids)


def _call(signal: str, tensors: dict, backend: str, divergence: str, beta: float, reduction: str, mask):
    """(per-row values, loss) of ``signal`` with the student tensors requiring grad."""
    hs, ws, bs = (tensors[k].requires_grad_() for k in ("student_hidden", "student_weight", "student_bias"))
    stats = reduction != "none"
    common = dict(divergence=divergence, beta=beta, reduction=reduction, mask=mask, backend=backend,
                  return_stats=stats)
    if signal == "kl":
        out = opd_fast.fused_linear_kl(hs, ws, tensors["teacher_hidden"], tensors["teacher_weight"], student_bias=bs,
                                       teacher_bias=tensors.get("teacher_bias"), temperature=0.9, **common)
    elif signal.startswith("topk"):
        ids, log_p = _topk()
        out = opd_fast.fused_linear_kl_topk(hs, ws, ids, log_p, student_bias=bs, tail=signal.split("-")[1], **common)
    else:  # log-probs (and the entropy): no mask, every row counts
        ids, _ = _topk()
        logp, ent = opd_fast.fused_linear_logprobs(hs, ws, ids[:, 0], bias=bs, backend=backend, return_entropy=True)
        per_row = logp + ent
        return per_row.detach(), per_row.sum() if reduction != "none" else per_row
    if stats:
        loss, st = out
        return st["divergence"], loss
    return out.detach(), out


def _check(per_row: torch.Tensor, loss: torch.Tensor, tensors: dict, poisoned: set[int], masked: int | None) -> None:
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * upstream).sum().backward()
    grad_h, grad_w = tensors["student_hidden"].grad, tensors["student_weight"].grad
    finite_rows = torch.isfinite(per_row.double()).tolist()
    finite_grad_rows = torch.isfinite(grad_h.double()).all(1).tolist()
    assert [i for i in range(N) if not finite_rows[i]] == sorted(poisoned), f"non-finite values {per_row.tolist()}"
    assert [i for i in range(N) if not finite_grad_rows[i]] == sorted(poisoned), "non-finite grad-hidden rows"
    assert not bool(torch.isfinite(loss).all()), f"loss {loss} is finite"
    assert not bool(torch.isfinite(grad_w).all()), "grad-weight is finite"
    if masked is not None:
        assert float(per_row[masked]) == 0.0 and bool((grad_h[masked] == 0).all()), "the masked row was computed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_kl_rows_propagate_and_masked_rows_stay_ignored(backend, dtype, divergence, beta, reduction):
    tensors = _tensors(dtype)
    _poison(tensors, KL_POISON)
    mask = torch.arange(N) != MASKED_ROW
    per_row, loss = _call("kl", tensors, backend, divergence, beta, reduction, mask)
    _check(per_row, loss, tensors, set(KL_POISON), MASKED_ROW)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signal", ["topk-bucket", "topk-renormalize"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["none", "mean"])  # renormalize: "none" is the k-sparse path, "mean" the sweep
def test_topk_rows_propagate_and_masked_rows_stay_ignored(backend, dtype, signal, divergence, beta, reduction):
    tensors = _tensors(dtype)
    _poison(tensors, STUDENT_POISON)
    mask = torch.arange(N) != MASKED_ROW
    per_row, loss = _call(signal, tensors, backend, divergence, beta, reduction, mask)
    _check(per_row, loss, tensors, set(STUDENT_POISON), MASKED_ROW)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprob_rows_propagate(backend, dtype):
    tensors = _tensors(dtype)
    for row, (_, value) in STUDENT_POISON.items():
        tensors["student_hidden"][row, 1] = value
    per_row, loss = _call("logprobs", tensors, backend, "forward_kl", 0.5, "none", None)
    _check(per_row, loss, tensors, set(STUDENT_POISON), None)


BIAS_SIGNALS = ("kl-student", "kl-teacher", "topk-bucket", "topk-renormalize")
BIAS_CASES = [(s, d, b) for s in BIAS_SIGNALS for d, b in DIVERGENCES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signal,divergence,beta", [*BIAS_CASES, ("logprobs", "forward_kl", 0.5)])
def test_a_nan_bias_entry_reaches_the_rows_that_depend_on_it(backend, signal, divergence, beta):
    """A NaN logit column poisons every row of a full-vocabulary signal; renormalized top-k only
    depends on the ids' logits, so exactly the rows whose ids hold the column are poisoned."""
    tensors = _tensors(torch.float32)
    ids, _ = _topk()
    column = int(ids[0, 0])
    if signal == "kl-teacher":
        tensors["teacher_bias"] = torch.randn(V, dtype=torch.float32)
        tensors["teacher_bias"][column] = NAN
    else:
        tensors["student_bias"][column] = NAN
    poisoned = set(range(N))
    if signal == "topk-renormalize":
        poisoned = {i for i in range(N) if column in ids[i].tolist()}
        assert 0 < len(poisoned) < N
    per_row, loss = _call("kl" if signal.startswith("kl") else signal, tensors, backend, divergence, beta, "none", None)
    if signal == "topk-renormalize":  # the unused column's NaN bias gradient is 0 there: grad-weight is finite
        loss.sum().backward()
        finite = torch.isfinite(per_row.double()).tolist()
        assert {i for i in range(N) if not finite[i]} == poisoned
        finite_grad = torch.isfinite(tensors["student_hidden"].grad.double()).all(1).tolist()
        assert {i for i in range(N) if not finite_grad[i]} == poisoned
        return
    _check(per_row, loss, tensors, poisoned, None)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_fp16_logits_beyond_65504_are_right_or_non_finite(backend, divergence, beta):
    """The fp16 GEMM overflows to inf above 65504 (the float64 reference does not): the result must
    then be non-finite, loss and gradient alike, never a finite number that is wrong."""
    g = torch.Generator().manual_seed(0)
    hs = (torch.rand(4, 8, generator=g) * 240).half().requires_grad_()  # logits up to ~70000
    ws = (torch.rand(16, 8, generator=g) * 90).half().requires_grad_()
    ht, wt = torch.randn(4, 8, generator=g).half(), torch.randn(16, 8, generator=g).half()
    kw = dict(divergence=divergence, beta=beta)
    assert float((hs.detach().double() @ ws.detach().double().T).max()) > 65504
    want = opd_fast.fused_linear_kl(hs.detach().double(), ws.detach().double(), ht, wt, backend="reference", **kw)
    got = opd_fast.fused_linear_kl(hs, ws, ht, wt, backend=backend, **kw)
    got.backward()
    if bool(torch.isfinite(got)):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-3)
        assert bool(torch.isfinite(hs.grad).all()) and bool(torch.isfinite(ws.grad).all())
    else:
        assert not bool(torch.isfinite(hs.grad).all()), "a non-finite loss with a finite gradient"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("student_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_student_with_float64_teacher(backend, divergence, beta, student_dtype):
    """A float64 teacher meets a low-precision student in the student's accumulation dtype (the
    torch backend's forward KL used to fail on the mixed-dtype row products)."""
    tensors = _tensors(student_dtype, seed=3)
    for name in ("teacher_hidden", "teacher_weight"):
        tensors[name] = tensors[name].double()
    _, loss = _call("kl", tensors, backend, divergence, beta, "mean", None)
    as64 = {k: v.detach().double() for k, v in tensors.items()}
    _, want = _call("kl", as64, "reference", divergence, beta, "mean", None)
    rtol, atol = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (5e-2, 1e-2)}[student_dtype]
    torch.testing.assert_close(loss.double(), want.detach(), rtol=rtol, atol=atol)
    loss.backward()
    want.backward()
    got_g, want_g = tensors["student_hidden"].grad.double(), as64["student_hidden"].grad
    scale = want_g.abs().max()
    torch.testing.assert_close(got_g / scale, want_g / scale, rtol=rtol, atol=atol)


# Triton on CPU tensors: the interpreter (TRITON_INTERPRET=1), through the public functions.
INTERPRETED_TRITON = availability("triton", CPU)[0] and not torch.cuda.is_available()
needs_routed_triton = pytest.mark.skipif(not INTERPRETED_TRITON,
                                         reason="Triton numerics run here under TRITON_INTERPRET=1")


@pytest.fixture
def routed_triton():
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy inf - inf in masked lanes


@needs_routed_triton
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("signal,reduction", [("kl", "none"), ("kl", "mean"), ("topk-bucket", "mean"),
                                              ("topk-renormalize", "mean")])
def test_triton_rows_propagate(routed_triton, signal, reduction, divergence, beta):
    """fp32 only: the interpreter's ``tl.dot`` is wrong on bf16 (fp16 is covered by the fuzz hook)."""
    tensors = _tensors(torch.float32)
    _poison(tensors, KL_POISON if signal == "kl" else STUDENT_POISON)
    mask = torch.arange(N) != MASKED_ROW
    per_row, loss = _call(signal, tensors, "triton", divergence, beta, reduction, mask)
    _check(per_row, loss, tensors, set(KL_POISON if signal == "kl" else STUDENT_POISON), MASKED_ROW)


@needs_routed_triton
def test_triton_logprob_rows_propagate(routed_triton):
    tensors = _tensors(torch.float32)
    for row, (_, value) in STUDENT_POISON.items():
        tensors["student_hidden"][row, 1] = value
    per_row, loss = _call("logprobs", tensors, "triton", "forward_kl", 0.5, "none", None)
    _check(per_row, loss, tensors, set(STUDENT_POISON), None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_all_minus_inf_row_has_no_distribution(backend):
    """Every logit of a row -inf (a -inf hidden state on a positive weight column): log-prob and entropy are
    both NaN there, not a log-prob of NaN beside an entropy of 0."""
    g = torch.Generator().manual_seed(4)
    hs, ws = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g)
    ws[:, 0] = ws[:, 0].abs() + 0.1
    hs[1, 0] = -INF
    logp, ent = opd_fast.fused_linear_logprobs(hs, ws, torch.tensor([0, 1, 2]), return_entropy=True, backend=backend)
    assert torch.isfinite(logp).tolist() == [True, False, True]
    assert torch.isfinite(ent).tolist() == [True, False, True]
