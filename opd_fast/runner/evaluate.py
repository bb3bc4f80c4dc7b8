"""Evaluation: task accuracy (greedy and sampled, per domain) and reverse KL against the teacher.

Accuracy uses each domain's verifier: ``loss.verifiers[domain]`` (``module:function``), else the
task's ``verify``, else exact match of the stripped completion and reference. The reverse KL is the
mean per-token ``KL(student || teacher)`` over the student's own samples (the sampled rollouts, or
the greedy ones when ``sampled`` is off), from the fused loss on hidden states.

Public API: ``evaluate`` (models already loaded), ``evaluate_run`` (from a config and an optional
checkpoint), ``Verifiers``, ``exact_match``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import opd_fast

from ..plugins import load_object
from ..tasks import Example, get_task
from .config import RolloutConfig, RunConfig
from .data import Prompt, load_examples
from .models import LoadedModel, Teacher, forward_hidden, load_run_models, torch_threads
from .preflight import check_config
from .rollout import rollout
from .score import Router, score

Verifier = Callable[[str, str, str], float]


def exact_match(prompt: str, completion: str, reference: str) -> float:
    return float(completion.strip() == reference.strip())


class Verifiers:
    """Domain -> verifier, resolved once from the config (``module:function`` or ``file.py:function``, trusted
    code run in-process), the task, or exact match."""

    def __init__(self, specs: dict[str, str], task: str = "") -> None:
        self.default: Verifier = get_task(task).verify if task else exact_match
        self.by_domain: dict[str, Verifier] = {}
        for domain, spec in specs.items():
            self.by_domain[domain] = load_object(spec, f"loss.verifiers.{domain}")

    def __call__(self, domain: str, prompt: str, completion: str, reference: str) -> float:
        return float(self.by_domain.get(domain, self.default)(prompt, completion, reference))


@torch.no_grad()
def _reverse_kl(student: LoadedModel, teachers: dict[str, Teacher], router: Router,
                batch: Any) -> dict[str, tuple[float, int]]:
    """Sum of per-token reverse KL and token count per domain."""
    scored = score(batch, teachers, router)
    device = student.device
    hidden, _ = forward_hidden(student, batch.input_ids.to(device), batch.attention_mask.to(device))
    sums: dict[str, tuple[float, int]] = {}
    for ts in scored.scores:
        hs = batch.target_states(hidden[ts.rows.to(device)], ts.rows)
        per_tok = opd_fast.fused_linear_kl(
            hs, student.head.weight, ts.hidden, ts.head.weight, divergence="reverse_kl", reduction="none",
            vocab_size=teachers[ts.teacher].vocab_size, **student.head.loss_kwargs("student"),
            **ts.head.loss_kwargs("teacher"),
        )
        counts = batch.target_mask[ts.rows].sum(1).tolist()
        for r, part in zip(ts.rows.tolist(), torch.split(per_tok.float().cpu(), counts), strict=True):
            s, n = sums.get(batch.prompts[r].domain, (0.0, 0))
            sums[batch.prompts[r].domain] = (s + float(part.sum()), n + part.numel())
    return sums


def evaluate(
    student: LoadedModel,
    teachers: dict[str, Teacher],
    router: Router,
    examples: list[Example],
    rollout_cfg: RolloutConfig,
    verifiers: Verifiers,
    *,
    sampled: bool = True,
    seed: int = 0,
    chat_template: bool = False,
) -> dict[str, float]:
    """Accuracy per mode and domain (``greedy/accuracy/<domain>``, ``greedy/accuracy`` = mean over
    samples) and ``reverse_kl`` (+ ``reverse_kl/<domain>``)."""
    prompts = [Prompt(i, ex.prompt, ex.domain, ex.reference) for i, ex in enumerate(examples)]
    generator = torch.Generator(student.device).manual_seed(seed)
    modes = {"greedy": dataclasses.replace(rollout_cfg, temperature=0.0)}
    if sampled:
        modes["sampled"] = rollout_cfg
    results: dict[str, float] = {}
    kl: dict[str, tuple[float, int]] = {}
    size = rollout_cfg.micro_batch_size
    for mode, cfg in modes.items():
        correct: dict[str, list[float]] = {}
        for i in range(0, len(prompts), size):
            batch = rollout(student, prompts[i:i + size], cfg, generator, chat_template=chat_template)
            for p, text in zip(batch.prompts, batch.completions, strict=True):
                correct.setdefault(p.domain, []).append(verifiers(p.domain, p.prompt, text, p.reference or ""))
            if mode == list(modes)[-1]:
                for dom, (s, n) in _reverse_kl(student, teachers, router, batch).items():
                    kl[dom] = (kl.get(dom, (0.0, 0))[0] + s, kl.get(dom, (0.0, 0))[1] + n)
        for dom, vals in correct.items():
            results[f"{mode}/accuracy/{dom}"] = sum(vals) / len(vals)
        every = [v for vals in correct.values() for v in vals]
        results[f"{mode}/accuracy"] = sum(every) / max(1, len(every))
    for dom, (s, n) in kl.items():
        results[f"reverse_kl/{dom}"] = s / max(1, n)
    results["reverse_kl"] = sum(s for s, _ in kl.values()) / max(1, sum(n for _, n in kl.values()))
    return results


def evaluate_run(config: RunConfig, checkpoint: str | Path | None = None) -> dict[str, float]:
    """Load the student (from ``checkpoint`` if given) and teachers per ``config`` and evaluate."""
    check_config(config, training=False, student_dir=checkpoint is None or config.student.lora is not None)
    with torch_threads(config.run.threads):
        student, teachers = load_run_models(config, None if checkpoint is None else str(checkpoint),
                                            trainable=False)
        router = Router(teachers)
        examples = load_examples(config.data, "eval", config.eval.num_prompts, config.run.seed)
        router.check(sorted({ex.domain for ex in examples}))
        verifiers = Verifiers(config.loss.verifiers, config.data.task)
        return evaluate(student, teachers, router, examples, config.rollout, verifiers,
                        sampled=config.eval.sampled, seed=config.run.seed, chat_template=config.data.chat_template)
