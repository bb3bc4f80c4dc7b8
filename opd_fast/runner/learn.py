"""Learning: student forward, the distillation loss, backward, and the optimizer step.

Per micro-batch: the student's final hidden states at the positions predicting completion tokens
meet each teacher's signal in ``opd_fast.fused_linear_kl`` (or the top-k / sampled-token losses).
Every term is divided by ``num_items`` = the number of completion tokens of the *whole step* (all
micro-batches), so gradient accumulation gives the same gradient as one big batch. Each teacher's term
has its own weight and temperature (``Teacher.weight``, ``Teacher.temperature``, default the loss's), and
its divergence, the student's entropy and its share of the tokens are kept per teacher, so a teacher
whose signal disagrees with the others shows in the metrics. Optional terms:

- SFT / hard labels: cross-entropy on dataset reference completions (``sft_weight``), normalized by
  the step's reference-token count.
- Verifier reward: a policy-gradient term ``-adv * log q(token)`` on the sampled tokens with a per-sample
  advantage (reward minus its prompt group's mean), weight ``verifier_weight``.

Async mode (rollouts sampled by an older snapshot of the student) can weight the sampled-token terms
(the ``sampled`` signal, the verifier term) per token by the truncated importance ratio
``min(clip, q_now(y) / q_sampler(y))`` (``ImportanceWeights``), from the sampler log-probs recorded at
rollout. Full-vocabulary and top-k terms are never weighted: at each visited state they are exact
expectations over the next token, so a per-token ratio corrects nothing there; the state distribution's
shift would need the product of ratios over the whole prefix, whose variance grows with the length.

``Learner.step()`` clips, steps AdamW and the warm-up + cosine schedule; a non-finite loss or grad
norm skips the update (counted), and ``max_consecutive_skips`` in a row raise ``RuntimeError``.

Public API: ``Learner`` (``micro_step``, ``step``, ``state_dict``/``load_state_dict``), ``MicroStats``,
``ImportanceWeights``, ``lr_lambda``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import opd_fast

from ..distributed.dtensor import gathered
from .config import LossConfig, OptimConfig
from .models import Head, LoadedModel, Teacher, forward_hidden, token_logprobs
from .rollout import RolloutBatch
from .score import ScoredBatch, TeacherScores


def decay(schedule: str, progress: float) -> float:
    """The share of the way from the peak down to the floor still left at ``progress`` in [0, 1] of the decay."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Linear warm-up to 1, then a cosine or linear decay to ``min_ratio`` at ``total`` (or constant 1).

    The warm-up's first step already has ``1 / (warmup + 1)`` of the rate, unlike the Hugging Face
    schedules' 0, so no optimizer step is spent only on AdamW's moments."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * decay(schedule, progress)


@dataclass
class MicroStats:
    """Sums over one micro-batch (divide by token counts when logging)."""

    loss: float = 0.0
    entropy_sum: float = 0.0
    divergence_sum: dict[str, float] = field(default_factory=dict)  # key "teacher/<name>" or "domain/<name>"
    divergence_tokens: dict[str, int] = field(default_factory=dict)
    teacher_entropy_sum: dict[str, float] = field(default_factory=dict)  # student entropy on each teacher's rows
    teacher_tokens: dict[str, int] = field(default_factory=dict)  # completion tokens routed to each teacher
    per_sample_divergence: list[float] = field(default_factory=list)  # mean per token, per row
    importance_sum: float = 0.0  # sum and count of the importance weights applied (async mode)
    importance_tokens: int = 0
    finite: bool = True


@dataclass(frozen=True)
class ImportanceWeights:
    """Per sampled token ``min(clip, exp(log q_now(y) - log q_sampler(y)))``, ``q_now`` at the rollout's
    ``temperature`` (plain sampling only: top-k / top-p truncation would make the ratio differ from 1
    even on the sampler's own weights). Truncation bounds the variance a stale, unlikely token adds."""

    clip: float
    temperature: float

    @torch.no_grad()
    def __call__(self, batch: RolloutBatch, states: torch.Tensor, head: Head) -> torch.Tensor:
        """Weights ``(N,)`` of ``batch.targets`` given the student's ``states`` ``(N, H)`` predicting them."""
        log_q = token_logprobs(states, head, batch.targets.to(states.device), self.temperature).float()
        ratio = torch.exp(log_q - batch.target_sampler_logprobs().to(log_q.device))
        return ratio.clamp(max=self.clip)


def _clip_grad_norm(params: list[torch.Tensor], clip: float) -> float:
    """``clip_grad_norm_`` whose norm is the whole model's when the gradients are sharded DTensors (FSDP): their
    norm is gathered once, and every shard is scaled by the same factor."""
    norm = gathered(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return float(norm)


class Learner:
    """Owns the student's optimizer and schedule; turns scored micro-batches into updates."""

    def __init__(
        self,
        student: LoadedModel,
        loss: LossConfig,
        optim: OptimConfig,
        teachers: dict[str, Teacher],
        importance: ImportanceWeights | None = None,
        gradient_sync: Callable[[list[torch.Tensor], bool], bool] | None = None,
        backward_always: bool = False,
    ) -> None:
        """``gradient_sync(params, finite)``, in a data-parallel run: sums the accumulated gradients over the
        ranks before clipping and returns whether every rank's loss was finite. ``backward_always``: run backward
        even on a non-finite loss (a sharded student's backward holds collectives every rank must join; the
        step is skipped all the same)."""
        self.student, self.loss_cfg, self.optim_cfg, self.teachers = student, loss, optim, teachers
        self.importance, self.gradient_sync, self.backward_always = importance, gradient_sync, backward_always
        self.params = [p for p in student.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, optim.warmup_steps, optim.steps, optim.min_lr_ratio, optim.schedule)
        )
        self.skipped = 0
        self.consecutive_skips = 0
        self._finite = True

    def _teacher_loss(
        self, hs: torch.Tensor, ts: TeacherScores, batch: RolloutBatch, num_items: float,
        token_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One teacher's weighted loss and per-token (divergence, entropy) stats for its rows;
        ``token_weights`` (importance weights of the rows' tokens) weight the sampled-token form only."""
        cfg, head, teacher = self.loss_cfg, self.student.head, self.teachers[ts.teacher]
        weight, temperature = teacher.weight * cfg.kd_weight, teacher.loss_temperature(cfg.temperature)
        if cfg.signal == "hidden":
            loss, st = opd_fast.fused_linear_kl(
                hs, head.weight, ts.hidden, ts.head.weight, divergence=cfg.divergence, beta=cfg.beta,
                temperature=temperature, reduction="mean", num_items=num_items,
                vocab_size=teacher.vocab_size, backend=cfg.backend, return_stats=True,
                **head.loss_kwargs("student"), **ts.head.loss_kwargs("teacher"),
            )
            return weight * loss, st["divergence"], st["student_entropy"]
        if cfg.signal == "topk":
            loss, st = opd_fast.fused_linear_kl_topk(
                hs, head.weight, ts.topk_ids, ts.topk_logprobs, divergence=cfg.divergence, beta=cfg.beta,
                temperature=temperature, reduction="mean", num_items=num_items, student_bias=head.bias,
                student_logit_scale=head.scale, student_softcap=head.softcap, vocab_size=teacher.vocab_size,
                backend=cfg.backend, return_stats=True,
            )
            return weight * loss, st.get("divergence"), st.get("student_entropy")
        # "sampled": score-function gradient of the single-sample reverse-KL estimate log q(y) - log p(y).
        targets = batch.target_ids(ts.rows).to(hs.device)
        log_q = token_logprobs(hs, head, targets, temperature)
        estimate = log_q.detach() - ts.token_logprobs
        per_token = estimate * log_q if token_weights is None else token_weights * estimate * log_q
        return weight * per_token.sum() / num_items, estimate, None

    def micro_step(
        self,
        scored: ScoredBatch,
        num_items: float,
        advantages: torch.Tensor | None = None,
        sft_batch: RolloutBatch | None = None,
        sft_items: float = 1.0,
    ) -> MicroStats:
        """Forward + backward of one micro-batch; gradients accumulate until ``step()``."""
        batch, cfg, device = scored.batch, self.loss_cfg, self.student.device
        hidden, _ = forward_hidden(self.student, batch.input_ids.to(device), batch.attention_mask.to(device))
        head = self.student.head  # after the forward, which gathers a sharded student's head (see ``sharding``)
        total = hidden.new_zeros((), dtype=torch.float32)
        out = MicroStats()
        row_div = torch.zeros(len(batch.prompts))
        weights = row_of_token = None
        if self.importance is not None and batch.source == "student":
            weights = self.importance(batch, batch.target_states(hidden), head)
            row_of_token = torch.arange(len(batch.prompts)).repeat_interleave(batch.target_mask.sum(1))
            out.importance_sum, out.importance_tokens = float(weights.sum()), weights.numel()
        for ts in scored.scores:
            hs = batch.target_states(hidden[ts.rows.to(device)], ts.rows)
            rows_weights = None if weights is None else weights[torch.isin(row_of_token, ts.rows).to(weights.device)]
            loss, div, ent = self._teacher_loss(hs, ts, batch, num_items, rows_weights)
            total = total + loss
            out.teacher_tokens[ts.teacher] = out.teacher_tokens.get(ts.teacher, 0) + hs.shape[0]
            if ent is not None:
                ent_sum = float(ent.detach().float().sum())
                out.entropy_sum += ent_sum
                out.teacher_entropy_sum[ts.teacher] = out.teacher_entropy_sum.get(ts.teacher, 0.0) + ent_sum
            if div is None:
                continue
            div = div.detach().float().cpu()
            counts = batch.target_mask[ts.rows].sum(1)
            row_div.index_add_(0, ts.rows.repeat_interleave(counts), div)
            self._add(out, f"teacher/{ts.teacher}", float(div.sum()), div.numel())
            for r, c, d in zip(ts.rows.tolist(), counts.tolist(), torch.split(div, counts.tolist()), strict=True):
                self._add(out, f"domain/{batch.prompts[r].domain}", float(d.sum()), c)
        lengths = torch.tensor(batch.completion_lengths()).clamp(min=1)
        out.per_sample_divergence = (row_div / lengths).tolist()
        if advantages is not None and cfg.verifier_weight > 0:
            log_q = token_logprobs(batch.target_states(hidden), head, batch.targets.to(device))
            adv = advantages.to(device).repeat_interleave(batch.target_mask.sum(1).to(device))
            if weights is not None:
                adv = adv * weights
            total = total - cfg.verifier_weight * (adv * log_q).sum() / num_items
        if sft_batch is not None and cfg.sft_weight > 0:
            h_ref, _ = forward_hidden(self.student, sft_batch.input_ids.to(device), sft_batch.attention_mask.to(device))
            log_q = token_logprobs(sft_batch.target_states(h_ref), head, sft_batch.targets.to(device))
            total = total - cfg.sft_weight * log_q.sum() / sft_items
        out.loss = float(total.detach())
        out.finite = math.isfinite(out.loss)
        if out.finite or self.backward_always:
            total.backward()
        self._finite = self._finite and out.finite
        return out

    @staticmethod
    def _add(out: MicroStats, key: str, value: float, count: int) -> None:
        out.divergence_sum[key] = out.divergence_sum.get(key, 0.0) + value
        out.divergence_tokens[key] = out.divergence_tokens.get(key, 0) + count

    def step(self) -> dict[str, float]:
        """Clip and apply the accumulated gradient, or skip it when anything is non-finite."""
        if self.gradient_sync is not None:
            self._finite = self.gradient_sync(self.params, self._finite)
        clip = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = _clip_grad_norm(self.params, clip)
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = not (self._finite and math.isfinite(grad_norm))
        if skipped:
            self.skipped += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.optim_cfg.max_consecutive_skips:
                raise RuntimeError(
                    f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient norm "
                    f"(optim.max_consecutive_skips={self.optim_cfg.max_consecutive_skips}); aborting. "
                    "Lower optim.lr, enable optim.grad_clip, or check the models' dtype."
                )
        else:
            self.optimizer.step()
            self.consecutive_skips = 0
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self._finite = True
        return {"grad_norm": grad_norm, "lr": lr, "skipped": float(skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "skipped": self.skipped,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped, self.consecutive_skips = state["skipped"], state["consecutive_skips"]
