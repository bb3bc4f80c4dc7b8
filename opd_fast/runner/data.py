"""Prompts: where they come from, how they are mixed, and which ones the student sees next.

Public API: ``Prompt`` (one sample slot, plain data), ``PromptPool`` (the training prompts, columnar;
the formats it reads are ``sources``'), ``read_examples`` / ``load_examples`` (prompt data or a task),
``PromptSource`` (mixture + group sampling + the anti-overfitting sampler, with ``state_dict``),
``encode_prompt``.

The anti-overfitting sampler ("adaptive"): each prompt keeps an exponential moving average of the
mean per-token divergence its recent samples had against the teacher. Within a domain a prompt is
drawn with weight ``max(min_weight, ema / max_ema)``; unseen prompts have weight 1. Why this: prompts
the student already matches the teacher on give almost no gradient, so spending rollouts on them is
wasted compute and repeatedly fitting them overfits; scaling by the domain's current maximum keeps the
rule free of the divergence's units; and the ``min_weight`` floor keeps every prompt in rotation so
forgetting on an "easy" prompt is noticed and corrected. Domain shares are fixed by the mixture weights
first, so the adaptive weights never starve a whole domain.

Cost: a step's draws never scan the pool. A prompt is proposed uniformly among the domain's prompts not
yet drawn this step (an index computation over the few already drawn) and kept with probability equal
to its weight (rejection sampling; the weights are at most 1), so a draw costs about ``1 / mean weight``
proposals (at most ``1 / min_weight`` on average), whatever the pool size; the domain's maximum EMA is
kept in a lazy heap (``O(log pool)`` per feedback). When a draw rejects ``MAX_PROPOSALS`` proposals in a
row it falls back to one exact weighted draw over the domain (vectorized), which keeps the distribution
exact. A JSONL pool keeps byte offsets into the memory-mapped file plus a domain code per line (numpy),
not a Python object per line, and a ``datasets`` pool the memory-mapped Arrow table; a prompt's row is
parsed when it is drawn.
"""

from __future__ import annotations

import heapq
import json
import math
import mmap
import random
from bisect import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ..tasks import Example, Message, get_task
from .config import DataConfig
from .sources import Columns, detect_format, open_dataset

MAX_PROPOSALS = 64  # rejected proposals before a draw switches to the exact vectorized draw
DATASET_BATCH = 4096  # rows per batch when a dataset is validated at start-up


@dataclass(frozen=True)
class Prompt:
    """One sample slot: ``index`` identifies the prompt in the pool (for sampler feedback)."""

    index: int
    prompt: str | list[Message]
    domain: str
    reference: str | None


def _parse_line(path: str | Path, lineno: int, line: str, columns: Columns) -> Example:
    """One JSONL line as an ``Example``; errors name the file and line."""
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON: {exc}") from exc
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object, got {line[:80]!r}")
    unknown = set(row) - columns.names
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(columns.names))}; "
                         "data.columns maps other column names)")
    return columns.example(row, where)


class PromptPool:
    """The training prompts, stored by column: a domain code and a has-reference flag per prompt (numpy),
    and the texts either as given ``Example`` objects, as byte ranges of a memory-mapped JSONL file, or as
    rows of a memory-mapped Arrow dataset (parsed again only when drawn), so a million-line file costs a
    few arrays, not a million objects."""

    def __init__(self, domain_names: list[str], domain_codes: np.ndarray, has_reference: np.ndarray,
                 fetch: Callable[[int], Example]) -> None:
        if len(domain_codes) == 0:
            raise ValueError("the prompt pool is empty")
        self.domain_names, self.domain_codes, self.has_reference = domain_names, domain_codes, has_reference
        self._fetch = fetch

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> PromptPool:
        names: dict[str, int] = {}
        codes = np.fromiter((names.setdefault(ex.domain, len(names)) for ex in examples), np.int32, len(examples))
        refs = np.fromiter((bool(ex.reference) for ex in examples), bool, len(examples))
        return cls(list(names), codes, refs, examples.__getitem__)

    @classmethod
    def from_jsonl(cls, path: str | Path, columns: Columns | None = None) -> PromptPool:
        """Validate every line once (errors name the line) and keep only offsets, domains and flags."""
        columns = columns or Columns.resolve({}, None, str(path))
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if Path(path).stat().st_size else b""
            buf = np.frombuffer(data, np.uint8)
            ends = np.flatnonzero(buf == ord("\n"))
            if len(buf) and buf[-1] != ord("\n"):
                ends = np.append(ends, len(buf))
            starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else ends
            names: dict[str, int] = {}
            keep = np.zeros(len(ends), bool)
            codes = np.zeros(len(ends), np.int32)
            refs = np.zeros(len(ends), bool)
            for lineno, raw in enumerate(f, 1):  # streamed: one line's objects alive at a time
                line = raw.decode()
                if line.strip():
                    ex = _parse_line(path, lineno, line, columns)
                    keep[lineno - 1], refs[lineno - 1] = True, bool(ex.reference)
                    codes[lineno - 1] = names.setdefault(ex.domain, len(names))
        if not keep.any():
            raise ValueError(f"{path}: no prompts")
        rows = np.flatnonzero(keep)
        lo_of, hi_of = starts[rows], ends[rows]

        def fetch(i: int) -> Example:
            return _parse_line(path, int(rows[i]) + 1, data[int(lo_of[i]):int(hi_of[i])].decode(), columns)

        return cls(list(names), codes[rows], refs[rows], fetch)

    @classmethod
    def from_dataset(cls, dataset: Any, columns: Columns, where: str) -> PromptPool:
        """Validate every row once, streaming in batches, and keep the Arrow-backed dataset for the texts."""
        names: dict[str, int] = {}
        codes = np.zeros(len(dataset), np.int32)
        refs = np.zeros(len(dataset), bool)
        selected = dataset.select_columns(sorted(columns.names & set(dataset.column_names)))
        for start in range(0, len(dataset), DATASET_BATCH):
            batch = selected[start:start + DATASET_BATCH]
            for offset, values in enumerate(zip(*batch.values(), strict=True)):
                ex = columns.example(dict(zip(batch, values, strict=True)), f"{where} row {start + offset}")
                codes[start + offset] = names.setdefault(ex.domain, len(names))
                refs[start + offset] = bool(ex.reference)
        if not len(dataset):
            raise ValueError(f"{where}: no prompts")
        return cls(list(names), codes, refs, lambda i: columns.example(selected[int(i)], f"{where} row {i}"))

    @classmethod
    def open(cls, path: str | Path, data: DataConfig, split: str) -> PromptPool:
        """The pool of a prompt file or dataset directory in any supported format (see ``sources``)."""
        fmt = detect_format(path, data.format)
        if fmt == "jsonl":
            return cls.from_jsonl(path, Columns.resolve(data.columns, None, str(path)))
        dataset = open_dataset(path, fmt, split)
        where = f"{path} ({fmt})"
        return cls.from_dataset(dataset, Columns.resolve(data.columns, dataset.column_names, where), where)

    def __len__(self) -> int:
        return len(self.domain_codes)

    def __getitem__(self, index: int) -> Example:
        return self._fetch(index)

    @property
    def missing_references(self) -> int:
        return int((~self.has_reference).sum())


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a JSONL file of ``{"prompt": ..., "domain"?: ..., "reference"?: ...}`` lines."""
    pool = PromptPool.from_jsonl(path)
    return [pool[i] for i in range(len(pool))]


def load_examples(data: DataConfig, split: str, n: int, seed: int) -> list[Example]:
    """Train or eval examples: ``data.prompts`` / ``data.eval_prompts`` (any format), or the task's split."""
    if data.task:
        return get_task(data.task).examples(split, n, seed)
    path = data.prompts if split == "train" else data.eval_prompts
    if not path:
        raise ValueError("config key 'data.eval_prompts' must be set to evaluate without a task")
    pool = PromptPool.open(path, data, data.split if split == "train" else data.eval_split)
    return [pool[i] for i in range(len(pool) if split == "train" else min(n, len(pool)))]


def prompt_text(prompt: str | list[Message]) -> str:
    """A prompt as one readable string (a conversation as ``role: content`` lines), for logs and tables."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[Message],
                  chat_template: bool = False) -> list[int]:
    """Prompt ids. A conversation, or a text with ``chat_template``, goes through the tokenizer's chat template
    (as one user turn) with the generation prompt; a plain text gets a BOS when the tokenizer has one and did not
    add it."""
    if chat_template or not isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not tokenizer.chat_template:
            raise ValueError(f"the prompt is a conversation (or data.chat_template is on) but the tokenizer "
                             f"{tokenizer.name_or_path!r} has no chat template: {str(messages)[:80]!r}")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


class PromptSource:
    """Draws ``prompts_per_step`` prompts per step (domain by mixture, prompt by sampler weight), each
    repeated ``group_size`` times consecutively. Deterministic given the seed and the feedback."""

    def __init__(
        self,
        examples: PromptPool | Sequence[Example],
        *,
        prompts_per_step: int,
        group_size: int,
        mixture: dict[str, float] | None = None,
        sampler: str = "adaptive",
        min_weight: float = 0.1,
        ema: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.pool = examples if isinstance(examples, PromptPool) else PromptPool.from_examples(examples)
        self.prompts_per_step, self.group_size = prompts_per_step, group_size
        self.sampler, self.min_weight, self.ema_decay = sampler, min_weight, ema
        codes = self.pool.domain_codes
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(self.pool.domain_names) + 1))
        # members[d]: the domain's prompt indices in pool order; position[i]: i's place among them
        self.members = {d: order[bounds[c]:bounds[c + 1]] for c, d in enumerate(self.pool.domain_names)}
        self.position = np.empty(len(self.pool), np.int64)
        for m in self.members.values():
            self.position[m] = np.arange(len(m))
        mixture = mixture or {d: float(len(m)) for d, m in self.members.items()}
        missing = sorted(set(mixture) - set(self.members))
        if missing:
            raise ValueError(
                f"config key 'data.mixture' names domains with no prompts: {missing}; domains: {sorted(self.members)}"
            )
        self.mixture = {d: w for d, w in mixture.items() if w > 0}
        if not self.mixture:
            raise ValueError(f"data.mixture gives every domain weight 0: {mixture}")
        self._mix_names = list(self.mixture)
        self._mix_cum = list(accumulate(self.mixture[d] for d in self._mix_names))
        self.ema = np.full(len(self.pool), np.nan)  # NaN = no feedback yet
        self._top: dict[str, list[tuple[float, int]]] = {}  # per domain: lazy max-heap of (-ema, index)
        self._live: dict[str, int] = {}  # per domain: live heap entries at the last compaction
        self.rng = random.Random(seed)

    @property
    def domains(self) -> list[str]:
        return sorted(self.mixture)

    def _domain_top(self, domain: str) -> float:
        """The domain's largest EMA (NaN when it has no feedback); stale heap entries are dropped here."""
        heap = self._top.get(domain)
        while heap and self.ema[heap[0][1]] != -heap[0][0]:
            heapq.heappop(heap)
        return -heap[0][0] if heap else math.nan

    def weight(self, index: int) -> float:
        """Sampling weight of one prompt within its domain (see the module docstring)."""
        value = float(self.ema[index])
        if self.sampler == "uniform" or math.isnan(value):
            return 1.0
        top = self._domain_top(self.pool.domain_names[self.pool.domain_codes[index]])
        return 1.0 if top <= 0 else max(self.min_weight, value / top)

    def _pick(self, domain: str, taken: list[int]) -> int:
        """Position in ``members[domain]`` of one draw, excluding the sorted positions ``taken``."""
        n = len(self.members[domain])
        if len(taken) == n:  # every prompt of the domain already drawn this step: repeats allowed
            taken = []
        free = n - len(taken)
        flat = self._top.get(domain) is None or self.sampler == "uniform" or not self._domain_top(domain) > 0
        for _ in range(1 if flat else MAX_PROPOSALS):
            pos = min(int(self.rng.random() * free), free - 1)
            for t in taken:  # the pos-th free position: step over the taken ones at or before it
                if t > pos:
                    break
                pos += 1
            if flat:
                return pos
            w = self.weight(int(self.members[domain][pos]))
            if w >= 1.0 or self.rng.random() < w:
                return pos
        return self._exact_pick(domain, taken)

    def _exact_pick(self, domain: str, taken: list[int]) -> int:
        """One weighted draw over the whole domain (vectorized): the rare fallback of ``_pick``."""
        values = self.ema[self.members[domain]]
        top = self._domain_top(domain)
        weights = np.where(np.isnan(values), 1.0, np.maximum(self.min_weight, values / top))
        weights[taken] = 0.0
        cum = np.cumsum(weights)
        return min(int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right")), len(cum) - 1)

    def next_batch(self) -> list[Prompt]:
        taken: dict[str, list[int]] = {}
        chosen: list[int] = []
        hi = len(self._mix_names) - 1
        for _ in range(self.prompts_per_step):
            domain = self._mix_names[bisect(self._mix_cum, self.rng.random() * self._mix_cum[-1], 0, hi)]
            positions = taken.setdefault(domain, [])
            pos = self._pick(domain, positions)
            if pos not in positions:
                positions.insert(bisect(positions, pos), pos)
            chosen.append(int(self.members[domain][pos]))
        examples = {i: self.pool[i] for i in set(chosen)}
        return [
            Prompt(i, examples[i].prompt, examples[i].domain, examples[i].reference or None)
            for i in chosen
            for _ in range(self.group_size)
        ]

    def update(self, indices: list[int], divergences: list[float]) -> None:
        """Feed back each sample's mean per-token divergence (several samples per prompt average)."""
        per_prompt: dict[int, list[float]] = {}
        for i, d in zip(indices, divergences, strict=True):
            per_prompt.setdefault(i, []).append(d)
        for i, ds in per_prompt.items():
            value, old = sum(ds) / len(ds), float(self.ema[i])
            self._set_ema(i, value if math.isnan(old) else self.ema_decay * old + (1 - self.ema_decay) * value)

    def _set_ema(self, index: int, value: float) -> None:
        self.ema[index] = value
        domain = self.pool.domain_names[self.pool.domain_codes[index]]
        heap = self._top.setdefault(domain, [])
        heapq.heappush(heap, (-value, index))
        if len(heap) > 64 + 2 * self._live.get(domain, 0):  # stale entries at most ~ the live ones
            live = {i: v for v, i in heap if self.ema[i] == -v}
            heap[:] = [(v, i) for i, v in live.items()]
            heapq.heapify(heap)
            self._live[domain] = len(heap)

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the prompts with feedback and their EMAs (tensors), and the RNG state (ints)."""
        seen = np.flatnonzero(~np.isnan(self.ema))
        return {"ema_index": torch.from_numpy(seen), "ema_value": torch.from_numpy(self.ema[seen]),
                "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema[:] = np.nan
        self._top.clear()
        self._live.clear()
        if "ema" in state:  # checkpoints written before the columnar sampler: {index: ema}
            pairs = [(int(k), float(v)) for k, v in state["ema"].items()]
        else:
            pairs = list(zip(state["ema_index"].tolist(), state["ema_value"].tolist(), strict=True))
        for index, value in pairs:
            self._set_ema(index, value)
        self.rng.setstate(state["rng"])


def prompt_source(data: DataConfig, seed: int) -> PromptSource:
    """The training ``PromptSource`` a config describes."""
    pool = (PromptPool.open(data.prompts, data, data.split) if data.prompts
            else PromptPool.from_examples(load_examples(data, "train", data.num_prompts, seed)))
    return PromptSource(
        pool,
        prompts_per_step=data.prompts_per_step, group_size=data.group_size, mixture=data.mixture,
        sampler=data.sampler, min_weight=data.sampler_min_weight, ema=data.sampler_ema, seed=seed,
    )
