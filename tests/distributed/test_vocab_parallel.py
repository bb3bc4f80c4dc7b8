"""Vocabulary-parallel losses on a 2-process gloo group equal the unsharded loss (values, stats, grads).

One group run serves every case: each rank computes every case on its shard of the heads, the test
process computes the same cases unsharded, and each case is one parametrized comparison. The bad-input
cases check that every rank raises (none hangs: the group run has a deadline).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from group_run import device, run_group

import opd_fast
from opd_fast.core.call import DIVERGENCES
from opd_fast.distributed import shard_rows

pytestmark = pytest.mark.slow  # one 2-process group run (about a minute on two shared cores)

WORLD = 2
LEADING, H_S, H_T, V = (3, 5), 8, 12, 37  # 37 rows: shards of 19 and 18


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "kl" | "topk" | "logprobs"
    options: dict = field(default_factory=dict)
    bias: bool = False
    labels: bool = False
    mask: bool = False
    dtype: torch.dtype = torch.float64

    @property
    def per_token(self) -> bool:
        return self.kind == "logprobs" or self.options.get("reduction") == "none"


CASES = [
    *(Case(f"kl-{d}", "kl", {"divergence": d, "beta": 0.3}) for d in DIVERGENCES),
    *(Case(f"kl-{d}-options", "kl", {"divergence": d, "temperature": 1.7, "student_softcap": 3.0,
                                     "teacher_logit_scale": 0.8, "return_stats": True}, bias=True, mask=True)
      for d in DIVERGENCES),
    Case("kl-none", "kl", {"divergence": "reverse_kl", "reduction": "none"}, mask=True),
    Case("kl-vocab-size", "kl", {"divergence": "jsd", "vocab_size": 30, "return_stats": True}),
    Case("kl-hard-labels", "kl", {"divergence": "forward_kl", "hard_weight": 0.5, "return_stats": True},
         labels=True, mask=True),
    Case("kl-hard-labels-t2", "kl", {"divergence": "tvd", "hard_weight": 1.0, "temperature": 2.0}, labels=True),
    *(Case(f"topk-{d}-{tail}", "topk", {"divergence": d, "tail": tail, "return_stats": True}, mask=True)
      for d in DIVERGENCES for tail in ("bucket", "renormalize")),
    Case("topk-scaled", "topk", {"divergence": "reverse_kl", "student_logit_scale": 1.3}, bias=True),
    Case("kl-fp32", "kl", {"divergence": "reverse_kl", "return_stats": True}, bias=True, dtype=torch.float32),
    Case("kl-bf16", "kl", {"divergence": "jsd", "hard_weight": 0.3}, labels=True, dtype=torch.bfloat16),
    Case("topk-bf16", "topk", {"divergence": "forward_kl"}, dtype=torch.bfloat16),
    Case("logprobs", "logprobs", {"temperature": 0.7}),
    Case("logprobs-entropy", "logprobs", {"return_entropy": True, "softcap": 2.5}, bias=True),
]


def _inputs(case: Case) -> dict:
    """The case's whole (unsharded) tensors, the same on every process."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    hidden, weight = rand(*LEADING, H_S), rand(V, H_S)
    t = {"hidden": hidden, "weight": weight, "bias": rand(V) if case.bias else None}
    if case.mask:
        t["mask"] = torch.rand(*LEADING, generator=g) > 0.3
    if case.labels:
        t["labels"] = torch.randint(0, case.options.get("vocab_size", V), LEADING, generator=g)
        t["labels"][0, 0] = -100
    if case.kind == "kl":
        t["teacher_hidden"], t["teacher_weight"] = rand(*LEADING, H_T), rand(V, H_T)
    if case.kind == "topk":
        logits = rand(*LEADING, V)
        logp, ids = logits.log_softmax(-1).topk(5, -1)
        ids[0, 1, -1] = -1  # a padding slot
        t["ids"], t["logprobs"] = ids, logp
    if case.kind == "logprobs":
        t["ids"] = torch.randint(0, V, LEADING, generator=g)
    t["upstream"] = rand(*LEADING)
    return {k: v.to(case.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in t.items()}


def _call(case: Case, t: dict, weight, bias, teacher_weight=None, group=None):
    if case.kind == "kl":
        extra = {"mask": t.get("mask"), "labels": t.get("labels")}
        return opd_fast.fused_linear_kl(t["hidden"], weight, t["teacher_hidden"], teacher_weight, student_bias=bias,
                                        backend="torch", process_group=group, **extra, **case.options)
    if case.kind == "topk":
        return opd_fast.fused_linear_kl_topk(t["hidden"], weight, t["ids"], t["logprobs"], student_bias=bias,
                                             mask=t.get("mask"), backend="torch", process_group=group, **case.options)
    return opd_fast.fused_linear_logprobs(t["hidden"], weight, t["ids"], bias=bias, backend="torch",
                                          process_group=group, **case.options)


def _evaluate(case: Case, group=None, on: torch.device | None = None) -> dict:
    """Values, stats and student gradients of one case; with ``group`` on this rank's shards."""
    t = {k: v.to(on) if isinstance(v, torch.Tensor) and on is not None else v for k, v in _inputs(case).items()}
    t["hidden"].requires_grad_(True)
    shard = (lambda x: x) if group is None else (lambda x: None if x is None else shard_rows(x, group))
    weight = shard(t["weight"]).clone().requires_grad_(True)
    bias = None if t["bias"] is None else shard(t["bias"]).clone().requires_grad_(True)
    out = _call(case, t, weight, bias, shard(t.get("teacher_weight")), group)
    values, stats = (out if isinstance(out, tuple) else (out, {}))
    if not isinstance(stats, dict):  # log-probs with entropy: (logprobs, entropy)
        values, stats = values, {"entropy": stats}
    scalar = (values * t["upstream"]).sum() + sum(s.sum() for s in stats.values() if s.requires_grad) \
        if case.per_token else values
    scalar.backward()
    return {"value": values.detach(), "stats": {k: s.detach() for k, s in stats.items()},
            "grad_hidden": t["hidden"].grad, "grad_weight": weight.grad,
            "grad_bias": None if bias is None else bias.grad}


# ---- bad input: every rank must raise ---------------------------------------------------------

def _bad_teacher_shard(rank: int, group, on: torch.device) -> None:
    h, w = torch.randn(4, H_S, device=on), torch.randn(V, H_S, device=on)
    wt = torch.randn(20 if rank == 0 else 18, H_T, device=on)  # rank 0's student shard has 19 rows
    opd_fast.fused_linear_kl(h, shard_rows(w, group), torch.randn(4, H_T, device=on), wt, process_group=group)


def _unsharded_teacher(rank: int, group, on: torch.device) -> None:
    w = torch.randn(V, H_S, device=on)
    opd_fast.fused_linear_kl(torch.randn(4, H_S, device=on), shard_rows(w, group), torch.randn(4, H_T, device=on),
                             torch.randn(V, H_T, device=on), process_group=group)


def _unreplicated_hidden(rank: int, group, on: torch.device) -> None:
    w = torch.randn(V, H_S, device=on)
    opd_fast.fused_linear_logprobs(torch.randn(4 + rank, H_S, device=on), shard_rows(w, group),
                                   torch.zeros(4 + rank, dtype=torch.long, device=on), process_group=group)


def _one_rank_bad_mask(rank: int, group, on: torch.device) -> None:
    w, h = torch.randn(V, H_S, device=on), torch.randn(4, H_S, device=on)
    mask = torch.ones(4, device=on) if rank == 1 else torch.ones(4, dtype=torch.bool, device=on)
    ids = torch.arange(2, device=on).expand(4, 2)
    opd_fast.fused_linear_kl_topk(h, shard_rows(w, group), ids, torch.full((4, 2), -1.0, device=on), mask=mask,
                                  process_group=group)


def _native_backend(rank: int, group, on: torch.device) -> None:
    w = torch.randn(V, H_S, device=on)
    opd_fast.fused_linear_logprobs(torch.randn(4, H_S, device=on), shard_rows(w, group),
                                   torch.zeros(4, dtype=torch.long, device=on), backend="cpu", process_group=group)


def _ids_beyond_the_shards(rank: int, group, on: torch.device) -> None:
    w = torch.randn(V, H_S, device=on)
    opd_fast.fused_linear_logprobs(torch.randn(4, H_S, device=on), shard_rows(w, group),
                                   torch.full((4,), V, device=on), process_group=group)


def _vocab_size_short_of_a_shard(rank: int, group, on: torch.device) -> None:
    w = torch.randn(V, H_S, device=on)
    opd_fast.fused_linear_kl_topk(torch.randn(4, H_S, device=on), shard_rows(w, group),
                                  torch.zeros(4, 1, dtype=torch.long, device=on), torch.zeros(4, 1, device=on),
                                  vocab_size=19, process_group=group)


BAD = {  # name -> (the rank's call, what every rank's error says (rank 0's first, then rank 1's))
    "teacher shard sizes differ": (_bad_teacher_shard,
                                   [r"rank 0: student_weight has 19 rows but teacher_weight has 20"] * 2),
    "unsharded teacher": (_unsharded_teacher, [r"teacher_weight holds the whole vocabulary"] * 2),
    "hidden not replicated": (_unreplicated_hidden, [r"must be replicated across the process group"] * 2),
    "one rank's bad mask": (_one_rank_bad_mask, [r"rank 1 of the process group rejected.*mask must be bool",
                                                 r"^mask must be bool"]),
    "native backend": (_native_backend, [r"backend='cpu' has no vocabulary-parallel engine"] * 2),
    "ids beyond the shards": (_ids_beyond_the_shards, [rf"token_ids must be in \[0, {V}\)"] * 2),
    "vocab_size short of a shard": (_vocab_size_short_of_a_shard,
                                    [r"vocab_size=19 leaves rank\(s\) \[1\] without compared rows"] * 2),
}


def _group_worker(rank: int, world: int) -> dict:
    group, on = dist.group.WORLD, device(rank)
    results = {case.name: _evaluate(case, group, on) for case in CASES}
    for name, (fn, _) in BAD.items():
        try:
            fn(rank, group, on)
        except (ValueError, TypeError, RuntimeError) as exc:
            results[name] = str(exc)
        else:
            results[name] = None
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_group(_group_worker, WORLD, Path(tmp_path_factory.mktemp("vocab_parallel")))


def _close(a: torch.Tensor, b: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """float64: the same numbers up to summation order. Lower precisions: each rank's partial sum is rounded to
    the dtype before the all-reduce, so entries near zero may differ by the dtype's rounding of the largest."""
    if dtype == torch.float64:
        tolerance = {"rtol": 1e-9, "atol": 1e-10}
    else:
        tolerance = {"rtol": 1.6e-2, "atol": torch.finfo(a.dtype).eps * float(b.abs().max())}
    torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sharded_equals_unsharded(case: Case, ranks: list[dict]) -> None:
    whole = _evaluate(case)
    for rank, results in enumerate(ranks):
        got = results[case.name]
        _close(got["value"], whole["value"], f"rank {rank} value", case.dtype)
        assert got["stats"].keys() == whole["stats"].keys()
        for k, s in whole["stats"].items():
            _close(got["stats"][k], s, f"rank {rank} stat {k}", case.dtype)
        _close(got["grad_hidden"], whole["grad_hidden"], f"rank {rank} hidden-state gradient (complete)", case.dtype)
    for name in ("grad_weight", "grad_bias"):
        if whole[name] is not None:  # sharded: the ranks' slices, in order, make the whole gradient
            _close(torch.cat([r[case.name][name] for r in ranks]), whole[name], name, case.dtype)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_on_every_rank(name: str, ranks: list[dict]) -> None:
    for rank, (results, pattern) in enumerate(zip(ranks, BAD[name][1], strict=True)):
        assert results[name] is not None, f"rank {rank} did not raise"
        assert re.search(pattern, results[name]), f"rank {rank}: {results[name]}"
