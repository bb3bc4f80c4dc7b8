"""Teacher-corrected rollouts: the routed teacher checks each sampled token during the decode loop.

A student too weak for its own samples to be informative wanders into states no teacher signal can
pull it back from. Here the teacher of each row decodes alongside the student, with its own KV cache
(one teacher decode step per student step, batched over the rows routed to it, on the decode path
``rollout.decode`` picks for that teacher: ``decode.py``), and vets the student's
token: a token outside the teacher's top-``k`` or given less than ``min_prob`` by the teacher (at the
rollout temperature) is *flagged*, and a flagged token is replaced by a sample from the teacher's
sampling distribution with probability ``rate`` (interleaved sampling, as in speculative knowledge
distillation). The replacement is the row's next input for both models, so the rest of the row
continues from the corrected prefix.

``rate`` decays linearly to 0 over ``decay_steps`` optimizer steps, handing control back to the
student as it improves; being a function of the step alone, it resumes exactly from a checkpoint. At
rate 0 the teachers are not run at all. The teacher draws and the replace-or-keep coins come from the
``Corrector``'s own generator, so the student's sampling stream is the one a plain rollout consumes:
with nothing flagged a corrected rollout equals the plain one, and with every token replaced it equals
the teacher's own rollout under the corrector's seed.

The recorded sampler log-prob of a token is that of the distribution it was drawn from: the student's
for kept tokens, the teacher's for replaced ones. Scoring and the loss are unchanged: every position
is still scored by the teacher's full distribution.

Cost: one forward of each routed teacher per decode step, batched over its rows (a teacher whose rows
have all finished is no longer run), on the rollout's thread. Teachers are frozen and run under
no_grad with a cache of their own, so this decode may overlap the score stage's forward of the same
teacher (strict mode's worker, async mode's learner).

Public API: ``Corrector`` (per run), ``CorrectedDecode`` (per rollout, driven by ``rollout``),
``correction_metrics`` (a step's metrics row entries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from transformers import PreTrainedTokenizerBase

from .config import CorrectionConfig, RolloutConfig
from .data import Prompt
from .decode import Decode, start_decode
from .models import Teacher, head_logits
from .rollout import RolloutBatch, sample_tokens
from .score import Router


class Corrector:
    """The run's correction rule and schedule, its teachers and its random stream (checkpoint
    ``generator``'s state with the run)."""

    def __init__(
        self,
        cfg: CorrectionConfig,
        sampling: RolloutConfig,
        tokenizer: PreTrainedTokenizerBase,
        teachers: Mapping[str, Teacher],
        router: Router,
        generator: torch.Generator | None = None,
    ) -> None:
        vocab = tokenizer.get_vocab()
        for name, teacher in teachers.items():
            if teacher.model.tokenizer.get_vocab() != vocab:
                raise ValueError(
                    f"rollout.correction needs the student's tokenizer on every teacher, but teacher {name!r} "
                    f"({teacher.model.path}) maps tokens to ids differently, so its tokens cannot replace the "
                    "student's one for one; remove [rollout.correction] or use same-tokenizer teachers"
                )
        self.cfg, self.sampling, self.teachers, self.router, self.generator = cfg, sampling, teachers, router, generator

    def rate(self, step: int) -> float:
        """Probability that a flagged token is replaced at optimizer ``step`` (1-based)."""
        c = self.cfg
        if c.decay_steps == 0:
            return c.rate
        return c.rate * min(1.0, max(0.0, 1.0 - (step - 1) / c.decay_steps))

    def begin(self, prompts: list[Prompt], step: int) -> CorrectedDecode | None:
        """The teacher side of one rollout of ``prompts`` at ``step``; None once the schedule is at 0."""
        rate = self.rate(step)
        if rate <= 0:
            return None
        return CorrectedDecode(self, self.router.route([p.domain for p in prompts]), rate)


class CorrectedDecode:
    """One rollout's teacher decodes (a KV cache per routed teacher) and per-step corrections."""

    def __init__(self, corrector: Corrector, rows: dict[str, list[int]], rate: float) -> None:
        self.corrector, self.rate = corrector, rate
        self.parts = [(corrector.teachers[name], torch.tensor(r, dtype=torch.long)) for name, r in rows.items()]
        self.decodes: list[Decode | None] = [None] * len(self.parts)  # started by the prefill

    def __call__(
        self,
        step_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor | None,
        tokens: torch.Tensor,
        logprobs: torch.Tensor,
        active: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed every teacher this step's inputs (as the student got them: ``step_ids`` ``(B, S)``, ``mask``
        over past + new, ``positions`` or None at the prefill), vet the student's ``tokens`` / ``logprobs``
        ``(B,)``; return the corrected tokens and log-probs and the bool mask of the rows replaced (finished
        rows included: the caller pads them and does not count them). A teacher whose rows have all
        finished (not ``active``) is not run again: they never resume."""
        s = self.corrector.sampling
        tokens, logprobs = tokens.clone(), logprobs.clone()
        replaced = torch.zeros_like(tokens, dtype=torch.bool)
        for part, (teacher, rows) in enumerate(self.parts):
            device = teacher.model.device
            idx = rows.to(step_ids.device)
            if not bool(active[idx].any()):
                continue
            ids, part_mask = step_ids[idx].to(device), mask[idx].to(device)
            decode = self.decodes[part]
            if decode is None:  # the prefill (positions None): the teacher decodes the way the student does
                decode, hidden = start_decode(teacher.model, ids, part_mask, s.max_new_tokens, s.decode)
                self.decodes[part] = decode
            else:
                hidden = decode.step(ids[:, -1], part_mask, positions[idx].to(device))
            # Only ids both heads cover: a padded teacher row is no token the student could take.
            logits = head_logits(hidden, teacher.head)[:, :teacher.vocab_size]
            t_tokens, t_lps = sample_tokens(logits, s.temperature, s.top_k, s.top_p, self.corrector.generator)
            swap = self._flagged(logits, tokens[idx].to(device))
            if self.rate < 1:
                coins = torch.rand(swap.shape, generator=self.corrector.generator, device=device)
                swap &= coins < self.rate
            swap = swap.to(tokens.device)
            tokens[idx] = torch.where(swap, t_tokens.to(tokens.device), tokens[idx])
            logprobs[idx] = torch.where(swap, t_lps.to(logprobs.device), logprobs[idx])
            replaced[idx] = swap
        return tokens, logprobs, replaced

    def _flagged(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Student tokens the teacher rejects: outside its top-k, below ``min_prob`` at the rollout
        temperature (the raw distribution for greedy), or beyond the ids it covers."""
        c, temperature = self.corrector.cfg, self.corrector.sampling.temperature
        z = logits / temperature if temperature > 0 else logits
        vocab = z.shape[-1]
        covered = tokens < vocab
        z_token = z.gather(-1, tokens.clamp(max=vocab - 1)[:, None])
        flagged = ~covered
        if 0 < c.topk < vocab:
            flagged |= (z > z_token).sum(-1) >= c.topk  # tokens ranked above it
        if c.min_prob > 0:
            flagged |= (z_token - torch.logsumexp(z, -1, keepdim=True)).squeeze(-1) < math.log(c.min_prob)
        return flagged


def correction_metrics(batches: list[RolloutBatch], router: Router, rate: float) -> dict[str, float]:
    """A step's ``correction_rate`` and ``corrected_fraction`` (replaced / completion tokens), overall and per
    teacher (``corrected_fraction/teacher/<name>``): a teacher that rejects far more than the others do
    disagrees with the student, or with them, more."""
    corrected: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for batch in batches:
        lengths = batch.completion_mask.sum(1)
        per_row = torch.zeros_like(lengths) if batch.corrected_mask is None else batch.corrected_mask.sum(1)
        for name, rows in router.route([p.domain for p in batch.prompts]).items():
            corrected[name] = corrected.get(name, 0) + int(per_row[rows].sum())
            tokens[name] = tokens.get(name, 0) + int(lengths[rows].sum())
    row = {"correction_rate": rate, "corrected_fraction": sum(corrected.values()) / max(1, sum(tokens.values()))}
    for name in sorted(tokens):
        row[f"corrected_fraction/teacher/{name}"] = corrected[name] / max(1, tokens[name])
    return row
