"""Agreeing on a vocabulary-sharded call across a process group, or failing on every rank.

A sharded loss runs collectives, so a call that one rank rejects while the others go on would hang
them in their first all-reduce. Every sharded call therefore makes two small exchanges before any
work: the ranks' shard sizes and leading shapes (from which every rank derives the same layout, or
the same error), then each rank's verdict on its own arguments (so a rank whose arguments are bad
raises its own error and every other rank raises one naming it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.call import LossCall, VocabShard


@dataclass(frozen=True)
class _RankFacts:
    """What one rank's arguments say about the layout (``None``: that argument is not a usable tensor)."""

    rows: tuple[int | None, ...]  # rows of each sharded head weight, in argument order
    leading: tuple[int, ...] | None
    dtensor: bool  # some head is a DTensor (sharded its own way: it cannot also be sharded by the group)


def _rows(weight: object) -> int | None:
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _is_dtensor(t: object) -> bool:
    from .dtensor import is_dtensor

    return is_dtensor(t)


def _all_gather(group: dist.ProcessGroup, obj: object) -> list:
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _layout(facts: Sequence[_RankFacts], names: Sequence[str]) -> tuple[int, ...] | str:
    """Every rank's shard rows, or the error every rank raises alike (all ranks see the same ``facts``)."""
    if any(f.dtensor for f in facts):
        return ("a DTensor head cannot also be sharded by process_group: pass the DTensor alone (it is gathered "
                "once per call) or its local vocabulary shard (weight.to_local()) with process_group")
    for r, f in enumerate(facts):
        missing = [n for n, rows in zip(names, f.rows, strict=True) if rows is None]
        if missing:
            return f"rank {r}: {', '.join(missing)} must be a 2-D (V_shard, H) tensor for a vocabulary-sharded loss"
    leadings = {f.leading for f in facts}
    if len(leadings) > 1:
        seen = ", ".join(f"rank {r} {f.leading}" for r, f in enumerate(facts))
        return ("the hidden states must be replicated across the process group (each rank holds a vocabulary "
                f"shard of the heads, not of the tokens), but their leading shapes differ: {seen}")
    per_rank = [f.rows for f in facts]
    if len(names) == 2:
        totals = [sum(rows[i] for rows in per_rank) for i in range(2)]
        for r, (s, t) in enumerate(per_rank):
            if s == t:
                continue
            if all(rows[1] == totals[0] for rows in per_rank):
                return (f"{names[1]} holds the whole vocabulary ({totals[0]} rows) on every rank while {names[0]} "
                        "is sharded: with process_group both heads must be vocabulary shards")
            return (f"rank {r}: {names[0]} has {s} rows but {names[1]} has {t}: both heads must be sharded the "
                    f"same way (shard sizes per rank: {names[0]} {[x[0] for x in per_rank]}, {names[1]} "
                    f"{[x[1] for x in per_rank]})")
    empty = [r for r, rows in enumerate(per_rank) if rows[0] == 0]
    if empty:
        return f"rank(s) {empty} hold no vocabulary rows: every rank needs a non-empty shard"
    return tuple(rows[0] for rows in per_rank)


def agreed_call(
    group: dist.ProcessGroup,
    weights: dict[str, object],
    hidden: object,
    build: Callable[[VocabShard], LossCall],
) -> LossCall:
    """``build`` this rank's call on the group's agreed layout; any rank's rejection is raised on all.

    ``weights``: the sharded head weights by argument name (the student's first). Raises
    ``ValueError`` (or the rejecting rank's own error, on that rank) identically on every rank.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    rank = dist.get_rank(group)
    leading = tuple(hidden.shape[:-1]) if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1 else None
    mine = _RankFacts(tuple(_rows(w) for w in weights.values()), leading,
                      any(_is_dtensor(w) for w in (*weights.values(), hidden)))
    layout = _layout(_all_gather(group, mine), list(weights))
    if isinstance(layout, str):
        raise ValueError(layout)
    shard = VocabShard(group=group, rank=rank, rows_per_rank=layout)
    call, error = None, None
    try:
        call = build(shard)
    except (ValueError, TypeError, RuntimeError) as exc:
        error = exc
    verdicts = _all_gather(group, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    rejected = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if rejected:
        r, message = rejected[0]
        raise ValueError(f"rank {r} of the process group rejected this sharded loss call ({message})")
    return call
