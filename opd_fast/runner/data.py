"""Prompts: where they come from, how they are mixed, and which ones the student sees next.

Public API: ``Prompt`` (one sample slot, plain data), ``load_examples`` (JSONL or a built-in task),
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
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..tasks import Example, get_task
from .config import DataConfig


@dataclass(frozen=True)
class Prompt:
    """One sample slot: ``index`` identifies the prompt in the pool (for sampler feedback)."""

    index: int
    prompt: str
    domain: str
    reference: str | None


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file of ``{"prompt": ..., "domain"?: ..., "reference"?: ...}`` lines."""
    examples = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {exc}") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{lineno}: each line needs a string 'prompt', got {line[:80]!r}")
        unknown = set(row) - {"prompt", "domain", "reference"}
        if unknown:
            raise ValueError(f"{path}:{lineno}: unknown keys {sorted(unknown)} (allowed: prompt, domain, reference)")
        examples.append(Example(row["prompt"], row.get("reference") or "", row.get("domain") or "default"))
    if not examples:
        raise ValueError(f"{path}: no prompts")
    return examples


def load_examples(data: DataConfig, split: str, n: int, seed: int) -> list[Example]:
    """Train or eval examples: ``data.prompts`` / ``data.eval_prompts`` files, or the task's split."""
    if data.task:
        return get_task(data.task).examples(split, n, seed)
    path = data.prompts if split == "train" else data.eval_prompts
    if not path:
        raise ValueError("config key 'data.eval_prompts' must be set to evaluate without a task")
    return read_jsonl(path)[:n] if split == "eval" else read_jsonl(path)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool = False) -> list[int]:
    """Prompt ids; a BOS is prepended when the tokenizer has one and did not add it."""
    if chat_template:
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


class PromptSource:
    """Draws ``prompts_per_step`` prompts per step (domain by mixture, prompt by sampler weight), each
    repeated ``group_size`` times consecutively. Deterministic given the seed and the feedback."""

    def __init__(
        self,
        examples: list[Example],
        *,
        prompts_per_step: int,
        group_size: int,
        mixture: dict[str, float] | None = None,
        sampler: str = "adaptive",
        min_weight: float = 0.1,
        ema: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.examples = examples
        self.prompts_per_step, self.group_size = prompts_per_step, group_size
        self.sampler, self.min_weight, self.ema_decay = sampler, min_weight, ema
        self.by_domain: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            self.by_domain.setdefault(ex.domain, []).append(i)
        mixture = mixture or {d: float(len(ix)) for d, ix in self.by_domain.items()}
        missing = sorted(set(mixture) - set(self.by_domain))
        if missing:
            raise ValueError(
                f"config key 'data.mixture' names domains with no prompts: {missing}; domains: {sorted(self.by_domain)}"
            )
        self.mixture = {d: w for d, w in mixture.items() if w > 0}
        if not self.mixture:
            raise ValueError(f"data.mixture gives every domain weight 0: {mixture}")
        self.ema: dict[int, float] = {}
        self.rng = random.Random(seed)

    @property
    def domains(self) -> list[str]:
        return sorted(self.mixture)

    def weight(self, index: int) -> float:
        """Sampling weight of one prompt within its domain (see the module docstring)."""
        if self.sampler == "uniform" or index not in self.ema:
            return 1.0
        top = max((self.ema[i] for i in self.by_domain[self.examples[index].domain] if i in self.ema), default=0.0)
        return 1.0 if top <= 0 else max(self.min_weight, self.ema[index] / top)

    def next_batch(self) -> list[Prompt]:
        domains = list(self.mixture)
        chosen: list[int] = []
        for _ in range(self.prompts_per_step):
            domain = self.rng.choices(domains, weights=[self.mixture[d] for d in domains])[0]
            pool = [i for i in self.by_domain[domain] if i not in chosen] or self.by_domain[domain]
            chosen.append(self.rng.choices(pool, weights=[self.weight(i) for i in pool])[0])
        return [
            Prompt(i, self.examples[i].prompt, self.examples[i].domain, self.examples[i].reference or None)
            for i in chosen
            for _ in range(self.group_size)
        ]

    def update(self, indices: list[int], divergences: list[float]) -> None:
        """Feed back each sample's mean per-token divergence (several samples per prompt average)."""
        per_prompt: dict[int, list[float]] = {}
        for i, d in zip(indices, divergences, strict=True):
            per_prompt.setdefault(i, []).append(d)
        for i, ds in per_prompt.items():
            value = sum(ds) / len(ds)
            self.ema[i] = value if i not in self.ema else self.ema_decay * self.ema[i] + (1 - self.ema_decay) * value

    def state_dict(self) -> dict[str, Any]:
        return {"ema": dict(self.ema), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = {int(k): float(v) for k, v in state["ema"].items()}
        self.rng.setstate(state["rng"])


def prompt_source(data: DataConfig, seed: int) -> PromptSource:
    """The training ``PromptSource`` a config describes."""
    return PromptSource(
        load_examples(data, "train", data.num_prompts, seed),
        prompts_per_step=data.prompts_per_step, group_size=data.group_size, mixture=data.mixture,
        sampler=data.sampler, min_weight=data.sampler_min_weight, ema=data.sampler_ema, seed=seed,
    )  # fmt: skip
