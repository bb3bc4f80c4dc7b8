"""Scoring: route each sample to its domain's teacher and return the teacher's signal.

The default signal is the teacher's final hidden states at the positions that predict completion
tokens (plus its ``Head``): the learner feeds them to the fused loss, so no logits are formed. The
``topk`` signal (a served teacher that only returns its k most likely tokens) and the ``sampled``
signal (the teacher's log-prob of each sampled token) are computed here from the same hidden
states, token-chunked, under no_grad.

A batch whose rows were handed off in groups while it decoded (``RolloutBatch.groups``) is scored group by
group, each on its own re-padded batch, whether the groups are scored as they finish (the strict pipeline)
or afterwards (serial): the same computation either way; ``merge_groups`` joins the groups' signals.

Public API: ``Router`` (domain -> teacher, checked at start-up), ``TeacherScores``, ``ScoredBatch``,
``score``, ``merge_groups``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .config import TeacherConfig
from .models import Head, Teacher, forward_hidden, head_logits, token_logprobs
from .rollout import RolloutBatch, RowGroup
from .sharding import is_sharded, join_forward


class Router:
    """Maps domains to teacher names. A teacher without ``domains`` takes every unclaimed domain."""

    def __init__(self, teachers: Mapping[str, TeacherConfig | Teacher]) -> None:
        self.explicit: dict[str, str] = {}
        for name, t in teachers.items():
            for domain in t.domains:
                if domain in self.explicit:
                    raise ValueError(
                        f"domain {domain!r} is routed to two teachers: {self.explicit[domain]!r} and {name!r} "
                        "(config key teachers.<name>.domains)"
                    )
                self.explicit[domain] = name
        fallback = [name for name, t in teachers.items() if not t.domains]
        if len(fallback) > 1:
            raise ValueError(f"teachers {fallback} all have empty 'domains'; at most one teacher may be the default")
        self.fallback = fallback[0] if fallback else None

    def teacher_for(self, domain: str) -> str:
        name = self.explicit.get(domain, self.fallback)
        if name is None:
            raise ValueError(
                f"domain {domain!r} has no teacher; add it to some teachers.<name>.domains "
                f"(routed domains: {sorted(self.explicit)})"
            )
        return name

    def check(self, domains: list[str]) -> None:
        """Start-up check: every domain the data can produce has a teacher."""
        for domain in domains:
            self.teacher_for(domain)

    def route(self, domains: list[str]) -> dict[str, list[int]]:
        """Row indices per teacher, in row order."""
        rows: dict[str, list[int]] = {}
        for i, domain in enumerate(domains):
            rows.setdefault(self.teacher_for(domain), []).append(i)
        return rows


@dataclass
class TeacherScores:
    """One teacher's signal for the rows routed to it, flattened over their completion tokens.

    ``hidden[k]`` is the teacher's state predicting the k-th completion token of ``rows`` taken in
    row-major order, i.e. ``batch.targets`` restricted to ``rows``.
    """

    teacher: str
    rows: torch.Tensor
    head: Head
    hidden: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    token_logprobs: torch.Tensor | None = None


@dataclass
class ScoredBatch:
    batch: RolloutBatch
    scores: list[TeacherScores] = field(default_factory=list)


def _topk(hidden: torch.Tensor, head: Head, k: int, temperature: float, chunk: int = 1024) -> tuple[torch.Tensor, ...]:
    """Top-k token ids and their (full-vocabulary normalized) log-probs, token-chunked."""
    ids, lps = [], []
    for i in range(0, hidden.shape[0], chunk):
        logp = torch.log_softmax(head_logits(hidden[i:i + chunk], head, temperature), -1)
        top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
        ids.append(top.indices)
        lps.append(top.values)
    return torch.cat(ids), torch.cat(lps)


def merge_groups(batch: RolloutBatch, parts: list[tuple[RowGroup, ScoredBatch]]) -> ScoredBatch:
    """``batch``'s signal from its groups' (each scored on ``group.batch``): rows renumbered into ``batch``."""
    out = ScoredBatch(batch)
    for group, scored in parts:
        rows = torch.tensor(group.rows, dtype=torch.long)
        for ts in scored.scores:
            ts.rows = rows[ts.rows]
            out.scores.append(ts)
    return out


@torch.no_grad()
def score(
    batch: RolloutBatch,
    teachers: Mapping[str, Teacher],
    router: Router,
    *,
    signal: str = "hidden",
    topk: int = 32,
    temperature: float = 1.0,
) -> ScoredBatch:
    """Run each teacher on its rows; return hidden states (or top-k / sampled-token log-probs at the
    teacher's own temperature, ``temperature`` when it has none). A batch with ``groups`` is scored per group."""
    if batch.groups:
        return merge_groups(batch, [(g, score(g.batch, teachers, router, signal=signal, topk=topk,
                                              temperature=temperature)) for g in batch.groups])
    out = ScoredBatch(batch)
    routed = router.route([p.domain for p in batch.prompts])
    for name in teachers:  # the same order on every rank, so that sharded teachers' collectives pair up
        teacher = teachers[name].model
        rows = routed.get(name)
        if rows is None:
            if is_sharded(teacher):  # the other ranks may forward it on this micro-batch: join their all-gathers
                join_forward(teacher)
            continue
        idx = torch.tensor(rows, dtype=torch.long)
        device = teacher.device
        hidden, _ = forward_hidden(teacher, batch.input_ids[idx].to(device), batch.attention_mask[idx].to(device))
        states = batch.target_states(hidden, idx)
        head, t_temperature = teacher.head, teachers[name].loss_temperature(temperature)
        scores = TeacherScores(name, idx, head)  # teacher parameters are frozen constants
        if signal == "hidden":
            scores.hidden = states
        elif signal == "topk":
            scores.topk_ids, scores.topk_logprobs = _topk(states, head, topk, t_temperature)
        else:
            targets = batch.target_ids(idx).to(device)
            scores.token_logprobs = token_logprobs(states, head, targets, t_temperature)
        out.scores.append(scores)
    return out
