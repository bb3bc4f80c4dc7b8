"""Rewards for the policy-gradient term: verifiers, and reward models normalized per domain.

A domain is scored by its verifier (``loss.verifiers``: trusted ``module:function`` code, the task's
``verify``, or exact match) unless ``loss.reward_models`` names a Hugging Face sequence-classification
model directory for it. A reward model's raw scores have an arbitrary scale and offset that differ
between models, so each domain's scores are standardized by a running mean and standard deviation
(over every score seen so far, this step's included) before they become advantages; the running
moments are part of the checkpoint, so a resumed run normalizes exactly as the uninterrupted one.
Verifier rewards are used as they are: they already share a scale (0 to 1 for pass/fail).

Public API: ``Rewards``, ``RewardModel``, ``RunningMoments``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..tasks import Message
from .data import Prompt, prompt_text
from .evaluate import Verifiers
from .hub import model_directory
from .models import load_tokenizer


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations (Chan et al.'s parallel update of Welford's algorithm)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: torch.Tensor) -> None:
        n = values.numel()
        if n == 0:
            return
        values = values.double()
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 0.0

    def standardize(self, values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """``(values - mean) / std``; a single score (no spread yet) only gets centred."""
        std = self.std
        return (values - self.mean) / (std if std > eps else 1.0)


class RewardModel:
    """A Hugging Face sequence-classification model with one output (its score for a completion), from a local
    directory or a model id in the HF cache.

    The prompt and completion are rendered as a user/assistant conversation when the reward model's
    tokenizer has a chat template (how reward models are trained), else concatenated. Remote code runs
    only when ``trust_remote_code`` is set: a model directory is data, and loading it should not run its
    Python unless the user says so."""

    def __init__(self, path: str, *, device: str = "cpu", trust_remote_code: bool = False,
                 max_length: int = 2048, key: str = "loss.reward_models") -> None:
        from transformers import AutoModelForSequenceClassification

        path = model_directory(path, label=f"config key {key!r}")  # a local directory or a cached model id
        if not Path(path, "config.json").is_file():
            raise ValueError(f"config key {key!r}: {path!r} is not a model directory (no config.json there)")
        try:
            self.tokenizer = load_tokenizer(path, trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, trust_remote_code=trust_remote_code).to(device).eval()
        except (OSError, ValueError) as exc:
            raise ValueError(f"config key {key!r}: cannot load a sequence-classification model from "
                             f"{path!r}: {exc}") from exc
        if self.model.config.num_labels != 1:
            raise ValueError(f"config key {key!r}: the reward model at {path!r} has num_labels="
                             f"{self.model.config.num_labels}; a reward model has one output (num_labels=1)")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Sequence classification reads the last non-pad token, so padding goes on the right.
        self.tokenizer.padding_side = "right"
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device
        self.max_length = max_length

    def _text(self, prompt: str | list[Message], completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            conversation = [*turns, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return prompt_text(prompt) + completion

    @torch.no_grad()
    def __call__(self, prompts: list[str | list[Message]], completions: list[str]) -> torch.Tensor:
        texts = [self._text(p, c) for p, c in zip(prompts, completions, strict=True)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_length).to(self.device)
        return self.model(**enc).logits[:, 0].float().cpu()


class Rewards:
    """One reward per sample: the domain's reward model (standardized per domain) or its verifier."""

    def __init__(self, verifiers: Verifiers, reward_models: dict[str, str], *, device: str = "cpu",
                 trust_remote_code: bool = False) -> None:
        self.verifiers = verifiers
        self.models = {domain: RewardModel(path, device=device, trust_remote_code=trust_remote_code,
                                           key=f"loss.reward_models.{domain}")
                       for domain, path in reward_models.items()}
        self.moments = {domain: RunningMoments() for domain in reward_models}

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> torch.Tensor:
        rewards = torch.empty(len(prompts), dtype=torch.float32)
        by_model: dict[str, list[int]] = {}
        for i, (p, text) in enumerate(zip(prompts, completions, strict=True)):
            if p.domain in self.models:
                by_model.setdefault(p.domain, []).append(i)
            else:
                rewards[i] = self.verifiers(p.domain, p.prompt, text, p.reference or "")
        for domain, rows in by_model.items():
            raw = self.models[domain]([prompts[i].prompt for i in rows], [completions[i] for i in rows])
            moments = self.moments[domain]
            moments.update(raw)
            rewards[rows] = moments.standardize(raw.double()).float()
        return rewards

    def state_dict(self) -> dict[str, Any]:
        return {domain: vars(m).copy() for domain, m in self.moments.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for domain, values in state.items():
            if domain in self.moments:
                self.moments[domain] = RunningMoments(**values)
