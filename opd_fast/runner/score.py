"""Scoring: route each sample to its domain's teacher and return the teacher's signal.

The default signal is the teacher's final hidden states at the positions that predict completion
tokens (plus its ``Head``): the learner feeds them to the fused loss, so no logits are formed. The
``topk`` signal (a served teacher that only returns its k most likely tokens) and the ``sampled``
signal (the teacher's log-prob of each sampled token) are computed here from the same hidden
states, token-chunked, under no_grad.

Scoring is two forwards per teacher: the prompts (``prefill``: they exist before the completions, so the strict
pipeline runs it while the student decodes) and then the completions on those prompt caches. A batch whose rows
were handed off in groups while it decoded (``RolloutBatch.groups``) has its completions forwarded group by
group, each group's on its rows' prompt caches, whether the groups are scored as they finish (strict) or
afterwards (serial): the same computation either way; ``merge_groups`` joins the groups' signals.

Public API: ``Router`` (domain -> teacher, checked at start-up), ``TeacherScores``, ``ScoredBatch``,
``PromptCache``, ``Prefill``, ``prefill``, ``prefill_of``, ``score``, ``merge_groups``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .config import TeacherConfig
from .data import Prompt
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


@dataclass
class PromptCache:
    """One teacher's forward of the prompts of the rows routed to it (left-padded as the rollout lays them out):
    its KV cache and its state at each row's last prompt position, the one predicting the first completion token."""

    rows: list[int]
    cache: DynamicCache
    last: torch.Tensor  # (R, H)
    mask: torch.Tensor  # (R, P), on the teacher's device

    def select(self, rows: list[int]) -> PromptCache:
        """The rows of ``rows`` (whole-batch numbers) that are this cache's, in a cache of their own."""
        where = {r: i for i, r in enumerate(self.rows)}
        mine = [r for r in rows if r in where]
        idx = torch.tensor([where[r] for r in mine], dtype=torch.long, device=self.last.device)
        cache = DynamicCache()
        for layer, past in enumerate(self.cache.layers):
            cache.update(past.keys[idx], past.values[idx], layer)
        return PromptCache(mine, cache, self.last[idx], self.mask[idx])


@dataclass
class Prefill:
    """The first half of a micro-batch's scoring: the routed teachers' forwards of its prompts (``prefill``),
    which can run as soon as the prompts exist, i.e. while the student decodes their completions."""

    caches: dict[str, PromptCache]

    def select(self, rows: list[int]) -> Prefill:
        """The prompt caches of a group of ``rows``, renumbered as the group batch's rows ``0..len(rows)-1``."""
        local = {r: i for i, r in enumerate(rows)}
        out = {}
        for name, pc in self.caches.items():
            part = pc.select(rows)
            if part.rows:
                out[name] = dataclasses.replace(part, rows=[local[r] for r in part.rows])
        return Prefill(out)


@torch.no_grad()
def prefill(
    prompts: list[Prompt], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, teachers: Mapping[str, Teacher],
    router: Router,
) -> Prefill:
    """Each routed teacher's forward of its rows of the left-padded prompts ``(B, P)``."""
    routed = router.route([p.domain for p in prompts])
    caches = {}
    for name in teachers:  # the same order on every rank, so that sharded teachers' collectives pair up
        teacher = teachers[name].model
        rows = routed.get(name)
        if rows is None:
            if is_sharded(teacher):  # the other ranks may forward it on this micro-batch: join their all-gathers
                join_forward(teacher)
            continue
        idx = torch.tensor(rows, dtype=torch.long)
        ids, mask = prompt_ids[idx].to(teacher.device), prompt_mask[idx].to(teacher.device)
        hidden, cache = forward_hidden(teacher, ids, mask, cache=DynamicCache())
        caches[name] = PromptCache(rows, cache, hidden[:, -1], mask)
    return Prefill(caches)


def prefill_of(batch: RolloutBatch, teachers: Mapping[str, Teacher], router: Router) -> Prefill:
    """``prefill`` of a batch's own prompt columns (what the rollout's prefill hook was given)."""
    p = batch.prompt_len
    return prefill(batch.prompts, batch.input_ids[:, :p], batch.attention_mask[:, :p], teachers, router)


@torch.no_grad()
def score(
    batch: RolloutBatch,
    teachers: Mapping[str, Teacher],
    router: Router,
    *,
    signal: str = "hidden",
    topk: int = 32,
    temperature: float = 1.0,
    prefilled: Prefill | None = None,
) -> ScoredBatch:
    """Run each teacher on its rows; return hidden states (or top-k / sampled-token log-probs at the
    teacher's own temperature, ``temperature`` when it has none).

    The teachers forward the completions on their prompt caches (``prefilled``, consumed; ``prefill_of`` the
    batch when not given), so a prefill made while the batch decoded is not repeated. A batch with ``groups``
    is scored per group, each on its rows' prompt caches."""
    prefilled = prefill_of(batch, teachers, router) if prefilled is None else prefilled
    if batch.groups:
        return merge_groups(batch, [(g, score(g.batch, teachers, router, signal=signal, topk=topk,
                                              temperature=temperature, prefilled=prefilled.select(g.rows)))
                                    for g in batch.groups])
    out = ScoredBatch(batch)
    p_len = batch.prompt_len
    for name in teachers:  # the same order as the prefill's
        teacher = teachers[name].model
        pc = prefilled.caches.get(name)
        if pc is None:
            if is_sharded(teacher):
                join_forward(teacher)
            continue
        idx = torch.tensor(pc.rows, dtype=torch.long)
        device = teacher.device
        completion = batch.input_ids[idx, p_len:].to(device)
        mask = torch.cat([pc.mask, batch.attention_mask[idx, p_len:].to(device)], 1)
        hidden, _ = forward_hidden(teacher, completion, mask, cache=pc.cache)
        # aligned to the columns from the last prompt token on: position j predicts completion column j
        hidden = torch.cat([pc.last[:, None], hidden], 1)
        states = hidden[:, :-1][batch.completion_mask[idx, p_len:].to(device)]
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
