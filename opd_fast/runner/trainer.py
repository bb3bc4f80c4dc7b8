"""The on-policy distillation loop: prompt -> rollout -> score -> learn -> step.

``train(config)`` runs it in one of three modes: ``run.pipeline = "strict"`` (the default: the score
stage on a worker thread, see ``pipeline.py``), ``"serial"``, or async (``run.max_staleness >= 1``:
rollouts on a student snapshot, ahead of the learner, see ``async_rollout.py``). Each step draws a
prompt group from the ``PromptSource``; the student samples completions micro-batch by micro-batch
(``rollout``), or, on a fraction ``off_policy_fraction`` of steps, the batch uses off-policy
completions (dataset references or teacher samples); the global completion-token count of the step
fixes the loss normalization; each micro-batch is then scored by its domain's teacher (``score``) and
learned from (``Learner.micro_step``); one optimizer step ends the step. Stages only pass plain data (``Prompt``
lists, ``RolloutBatch``, ``ScoredBatch``), so the pipelined modes overlap them without changing what
they compute. Every stage run is an interval of the ``Timeline`` (``timeline.py``), which gives the
step's stage times and overlap metrics and ``RUN_DIR/timeline.jsonl``. Under ``torchrun`` every rank runs
the loop on its share of each step's prompt groups, and rank 0 writes the run's files (``distributed.py``); a
sharded student or teacher (FSDP2) changes only a few hook points: decoding gathered, checkpoints gathered, and
evaluations on every rank (``sharding.py``).

Public API (stable): ``train(config, *, resume=False, overwrite=False, stop_after=None) -> dict``
(summary: steps, final_loss, steps_per_s, tokens_per_s, skipped_steps, run_dir, checkpoint, eval,
interrupted) and ``Trainer`` (built pieces, for callers that want to drive steps themselves). What a
run may do to its directory (new run, resume, overwrite) is ``run_dir``'s contract; what signals do
is ``signals``'.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import preflight, run_dir
from .async_rollout import RolloutProducer, StepRollouts
from .checkpoint import load_state, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig, config_to_dict, uses_importance_weights
from .correction import Corrector, correction_metrics
from .data import Prompt, load_examples, prompt_source, prompt_text
from .distributed import DataParallel, data_parallel, rank_seed
from .evaluate import Verifiers, evaluate
from .learn import ImportanceWeights, Learner, MicroStats
from .metrics import MetricsLogger, SilentLogger
from .models import LoadedModel, load_run_models, torch_threads
from .pipeline import StageWorker, main_threads, split_threads
from .rewards import Rewards
from .rollout import RolloutBatch, RowGroup, from_completions, rollout
from .score import Prefill, Router, ScoredBatch, merge_groups, prefill, score
from .sharding import shard_run, to_shard
from .signals import StopSignals, stop_on_signals
from .timeline import Timeline, stage_metrics
from .trackers import RunIdentity, SampleRecord

# What the strict pipeline hears from a rollout while it decodes: its early row groups and its prompts.
RolloutHooks = tuple[Callable[[RowGroup], None], Callable[[list[Prompt], torch.Tensor, torch.Tensor], None]]


def _chunks(items: list[Prompt], size: int) -> list[list[Prompt]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _step_sums(batches: list[RolloutBatch], stats: list[MicroStats]) -> dict[str, float]:
    """The additive quantities behind a step's metrics row, over this process's batches (a data-parallel run
    sums them over the ranks): loss, completion lengths, truncations, rows handed off early, entropy and, per
    teacher or domain key, divergence and its tokens, routed tokens and the student's entropy there."""
    lengths = [n for b in batches for n in b.completion_lengths()]
    sums = {"loss": sum(s.loss for s in stats), "length": float(sum(lengths)), "samples": float(len(lengths)),
            "truncated": float(sum(t for b in batches for t in b.truncated)),
            "early": float(sum(b.early_rows for b in batches)),
            "entropy": sum(s.entropy_sum for s in stats)}
    for s in stats:
        for key, value in [*((f"divergence/{k}", v) for k, v in s.divergence_sum.items()),
                           *((f"tokens/{k}", v) for k, v in s.divergence_tokens.items()),
                           *((f"routed/{k}", v) for k, v in s.teacher_tokens.items()),
                           *((f"entropy/{k}", v) for k, v in s.teacher_entropy_sum.items())]:
            sums[key] = sums.get(key, 0.0) + value
    return sums


class Trainer:
    """Everything a run needs, loaded and checked at start-up (models, routing, data, learner)."""

    def __init__(self, config: RunConfig, checkpoint: Path | None = None, state: dict[str, Any] | None = None,
                 dp: DataParallel | None = None) -> None:
        self.config = c = config
        self.dp = dp = dp or DataParallel()
        torch.manual_seed(c.run.seed)
        random.seed(c.run.seed)
        ckpt = None if checkpoint is None else str(checkpoint)
        self.student, self.teachers = load_run_models(c, ckpt, to_shard=to_shard(c, dp.world_size))
        dp.broadcast_parameters(self.student.model)
        self.sharding = shard_run(c, dp.world_size, self.student, self.teachers)
        self.router = Router(self.teachers)
        self.source = prompt_source(c.data, c.run.seed)
        self.router.check(self.source.domains)
        off_policy_refs = c.loss.off_policy_fraction > 0 and c.loss.off_policy_source == "dataset"
        needs_refs = {"loss.sft_weight": c.loss.sft_weight > 0, "loss.off_policy_source": off_policy_refs}
        missing = self.source.pool.missing_references
        for key, needed in needs_refs.items():
            if needed and missing:
                raise ValueError(f"config key {key!r} trains on dataset references, but {missing} prompts have none")
        importance = (ImportanceWeights(c.run.importance_clip, c.rollout.temperature)
                      if uses_importance_weights(c) else None)
        sync = dp.agree_finite if self.sharding.student else dp.sync_gradients  # FSDP sums gradients in backward
        self.learner = Learner(self.student, c.loss, c.optim, self.teachers, importance,
                               gradient_sync=sync if dp.world_size > 1 else None,
                               backward_always=self.sharding.student is not None)
        self.verifiers = Verifiers(c.loss.verifiers, c.data.task)
        self.rewards = Rewards(self.verifiers, c.loss.reward_models, device=c.run.device,
                               trust_remote_code=c.loss.reward_trust_remote_code)
        self.generator = torch.Generator(c.run.device).manual_seed(rank_seed(c.run.seed, dp.rank, 0))
        self.mix_rng = random.Random(c.run.seed + 1)
        self.corrector = None if c.rollout.correction is None else Corrector(
            c.rollout.correction, c.rollout, self.student.tokenizer, self.teachers, self.router,
            torch.Generator(c.run.device).manual_seed(c.run.seed + 2))
        # Rows handed off mid-rollout (rollout's ``handoff``): not beside a correction, whose teacher decoders keep
        # every row, nor with sharded models, whose ranks must run the same forwards (one per group).
        self.handoff = c.rollout.handoff_fraction if self.corrector is None and not self.sharding.any else 0.0
        self.step = 0
        self.dropped_samples = 0  # async mode: rollouts never learned from (in flight at a checkpoint)
        self.last_step: tuple[list[RolloutBatch], list[MicroStats]] = ([], [])
        self.run_info: dict[str, Any] = {}  # run id and schedule anchor, saved with every checkpoint
        self.timeline = Timeline()
        self.producer: RolloutProducer | None = None
        self._sampler_lock = threading.Lock()  # async mode: the producer draws while the learner updates
        if checkpoint is not None:
            state = load_state(checkpoint) if state is None else state
            saved = state["learner"]
            optimizer = self.sharding.load_optimizer(self.student, self.learner.optimizer, saved["optimizer"])
            self.learner.load_state_dict({**saved, "optimizer": optimizer})
            self.source.load_state_dict(state["sampler"])
            self.mix_rng.setstate(state["mix_rng"])
            self.rewards.load_state_dict(state.get("rewards", {}))
            set_rng_state(state["rng"], self.generator)  # rank 0's generator: the others re-derive theirs
            if self.corrector is not None:  # rollout.correction cannot change on resume (run_dir.APPLIED)
                self.corrector.generator.set_state(state["correction_rng"])
            self.step = state["step"]
            if dp.rank > 0:
                self.generator.manual_seed(rank_seed(c.run.seed, dp.rank, self.step))
            self.dropped_samples = state.get("dropped_samples", 0) + state.get("in_flight_samples", 0)

    # -- stages ---------------------------------------------------------------------------------
    def make_batch(self, step: int, lm: LoadedModel, prompts: list[Prompt], off_policy: bool,
                   hooks: RolloutHooks | None = None) -> RolloutBatch:
        """Rollout stage: ``lm`` (the student or its async snapshot) samples, teacher-corrected when so
        configured, or off-policy completions on an off-policy step; ``hooks`` get the prompts as the decoding
        starts (not beside a correction, whose teacher decoders run then) and the rows that finish early."""
        c = self.config
        if not off_policy:
            correction = None if self.corrector is None else self.corrector.begin(prompts, step)
            on_group, on_prompts = (None, None) if hooks is None else hooks
            return rollout(lm, prompts, c.rollout, self.generator, chat_template=c.data.chat_template,
                           correction=correction, handoff=self.handoff, on_group=on_group,
                           on_prompts=on_prompts if correction is None else None)
        if c.loss.off_policy_source == "dataset":
            return from_completions(self.student.tokenizer, prompts, [p.reference or "" for p in prompts], c.rollout,
                                    chat_template=c.data.chat_template)
        texts = [""] * len(prompts)
        for name, rows in self.router.route([p.domain for p in prompts]).items():
            part = rollout(self.teachers[name].model, [prompts[i] for i in rows], c.rollout, self.generator,
                           chat_template=c.data.chat_template, source="teacher")
            for i, text in zip(rows, part.completions, strict=True):
                texts[i] = text
        return from_completions(self.student.tokenizer, prompts, texts, c.rollout,
                                chat_template=c.data.chat_template, source="teacher")

    def roll_out(
        self, step: int, lm: LoadedModel, on_batch: Callable[[RolloutBatch], None] | None = None,
        hooks: RolloutHooks | None = None,
    ) -> StepRollouts:
        """Sample stage then rollout stage of ``step``: its prompts and every micro-batch's rollout; each
        batch goes to ``on_batch`` (the strict mode's scorer) as soon as it exists, and while it decodes,
        its prompts and the groups of its rows that finish early to ``hooks``."""
        c = self.config
        with self.timeline.stage(step, "sample"), self._sampler_lock:
            prompts = self.dp.shard(self.source.next_batch())  # every rank draws the global batch: same sampler
        fraction = c.loss.off_policy_fraction
        off_policy = fraction > 0 and self.mix_rng.random() < fraction
        micro = _chunks(prompts, c.rollout.micro_batch_size)
        batches = []
        with self.sharding.gathered():  # a sharded student decodes gathered (see ``sharding``)
            for i, mb in enumerate(micro):
                with self.timeline.stage(step, "rollout", i):
                    batches.append(self.make_batch(step, lm, mb, off_policy, hooks))
                if on_batch is not None:
                    on_batch(batches[-1])
        return StepRollouts(step, off_policy, micro, batches, version=step - 1)

    def advantages(self, batches: list[RolloutBatch]) -> list[torch.Tensor | None]:
        """Reward (verifier, or standardized reward model) minus the mean of its prompt group
        (consecutive ``group_size`` samples).

        Only student samples get the policy-gradient term: it is an on-policy estimator."""
        if self.config.loss.verifier_weight <= 0 or batches[0].source != "student":
            return [None] * len(batches)
        rewards = self.rewards([p for b in batches for p in b.prompts], [t for b in batches for t in b.completions])
        groups = rewards.view(-1, self.config.data.group_size)
        adv = (groups - groups.mean(1, keepdim=True)).view(-1)
        return list(torch.split(adv, [len(b.prompts) for b in batches]))

    def sft_batches(self, micro: list[list[Prompt]]) -> tuple[list[RolloutBatch | None], float]:
        """Reference completions for the optional hard-label term, and their token count."""
        c = self.config
        if c.loss.sft_weight <= 0:
            return [None] * len(micro), 1.0
        batches = [from_completions(self.student.tokenizer, mb, [p.reference or "" for p in mb], c.rollout,
                                    chat_template=c.data.chat_template) for mb in micro]
        return list(batches), float(sum(b.num_tokens for b in batches))

    def score_batch(self, step: int, micro_batch: int, batch: RolloutBatch,
                    prefilled: Prefill | None = None) -> ScoredBatch:
        """Score stage: the routed teachers' signal (nothing to score when ``kd_weight`` is 0), on the
        teachers' prompt caches (``prefilled``) when their prefill already ran."""
        c = self.config
        with self.timeline.stage(step, "score", micro_batch):
            if c.loss.kd_weight <= 0:
                return ScoredBatch(batch)
            return score(batch, self.teachers, self.router, signal=c.loss.signal, topk=c.loss.topk,
                         temperature=c.loss.temperature, prefilled=prefilled)

    def prefill_batch(self, step: int, micro_batch: int, prompts: list[Prompt], ids: torch.Tensor,
                      mask: torch.Tensor) -> Prefill:
        """The first half of the score stage: the routed teachers' forwards of the micro-batch's prompts."""
        with self.timeline.stage(step, "score", micro_batch):
            return prefill(prompts, ids, mask, self.teachers, self.router)

    def learn(
        self, plan: StepRollouts, scored: Callable[[int, RolloutBatch], ScoredBatch]
    ) -> tuple[list[MicroStats], dict[str, float], float]:
        """Learn stage of every micro-batch (``scored(i, batch)`` gives its teacher signal, in order), then
        the optimizer step; returns the stats, the update and the step's completion-token count."""
        step, batches = plan.step, plan.batches
        # every term's normalization, over all ranks' rollouts: the summed gradient is the global batch's
        advantages = self.advantages(batches)
        sft, sft_items = self.sft_batches(plan.micro)
        num_items, sft_items = self.dp.sum(float(sum(b.num_tokens for b in batches)), sft_items)
        stats: list[MicroStats] = []
        for i, (batch, adv, ref) in enumerate(zip(batches, advantages, sft, strict=True)):
            signal = scored(i, batch)
            with self.timeline.stage(step, "learn", i), self.student.autocast():  # the loss too computes in run.dtype
                stats.append(self.learner.micro_step(signal, num_items, adv, ref, sft_items))
        with self.timeline.stage(step, "optim"):
            update = self.learner.step()
        return stats, update, num_items

    def step_work(self, step: int) -> tuple[StepRollouts, list[MicroStats], dict[str, float], float]:
        """All stages of ``step`` in the configured mode (see the module docstring)."""
        c = self.config
        if self.producer is not None:
            plan = self.producer.take()
            return (plan, *self.learn(plan, lambda i, b: self.score_batch(step, i, b)))
        single = c.data.prompts_per_step * c.data.group_size <= c.rollout.micro_batch_size
        # One micro-batch without early groups: only its prompts' prefill could overlap its decoding, which on
        # a few cores costs more than it hides (the prefill gets a share of the threads; see pipeline.py).
        if c.run.pipeline == "serial" or c.loss.kd_weight <= 0 or (single and self.handoff == 0):
            plan = self.roll_out(step, self.student)
            return (plan, *self.learn(plan, lambda i, b: self.score_batch(step, i, b)))
        # The worker forwards each micro-batch's prompts through the teachers while the student decodes them,
        # then scores its row groups as they finish. With one micro-batch, its last group is scored on the
        # main thread with every thread, as nothing is left to overlap it with.
        total = c.run.threads or torch.get_num_threads()
        main, worker = split_threads(total)
        items: list[list[RowGroup | None]] = [[]]  # per micro-batch, the worker's items in order (None: prefill)
        prefills: dict[int, Prefill] = {}  # written by the worker; read once a micro-batch's items are done
        deferred: dict[int, RowGroup] = {}

        def score_group(i: int, group: RowGroup) -> ScoredBatch:
            return self.score_batch(step, i, group.batch, prefills[i].select(group.rows) if i in prefills else None)

        def work(item: tuple[int, RowGroup | tuple]) -> ScoredBatch | None:
            i, arg = item
            if not isinstance(arg, RowGroup):
                prefills[i] = self.prefill_batch(step, i, *arg)
                return None
            return score_group(i, arg)

        def on_prompts(prompts: list[Prompt], ids: torch.Tensor, mask: torch.Tensor) -> None:
            items[-1].append(None)
            scorer.submit((len(items) - 1, (prompts, ids, mask)))

        def on_group(group: RowGroup) -> None:
            items[-1].append(group)
            scorer.submit((len(items) - 1, group))

        def on_batch(batch: RolloutBatch) -> None:
            last = batch.groups[-1] if batch.groups else RowGroup(list(range(len(batch.prompts))), batch)
            if single:
                deferred[len(items) - 1] = last
            else:
                on_group(last)
            items.append([])

        def scored(i: int, batch: RolloutBatch) -> ScoredBatch:
            parts = [(group, scorer.result()) for group in items[i]]
            if i == len(plan.batches) - 1:  # the worker has nothing left: the rest of the step gets every thread
                torch.set_num_threads(total)
            if i in deferred:
                parts.append((deferred[i], score_group(i, deferred[i])))
            prefills.pop(i, None)
            return merge_groups(batch, [(group, result) for group, result in parts if group is not None])

        # room for two micro-batches' items: a prefill, the early groups and the last
        depth = 2 * (2 + (math.ceil(1 / self.handoff) if self.handoff > 0 else 0))
        with main_threads(main), StageWorker(work, worker, depth=depth, name="score-worker") as scorer:
            plan = self.roll_out(step, self.student, on_batch, (on_group, on_prompts))
            return (plan, *self.learn(plan, scored))

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics row."""
        step, t_start = self.step + 1, time.perf_counter()
        plan, stats, update, num_items = self.step_work(step)
        batches = plan.batches
        with self.timeline.stage(step, "sample"), self._sampler_lock:  # every rank's feedback: same sampler state
            indices, divergences, sums = self.dp.gather_step([p.index for b in batches for p in b.prompts],
                                                             [d for s in stats for d in s.per_sample_divergence],
                                                             _step_sums(batches, stats))
            self.source.update(indices, divergences)
        self.step = step
        if self.producer is not None:
            self.producer.publish(step)
        self.last_step = (batches, stats)  # what ``sample_records`` reports
        elapsed = time.perf_counter() - t_start
        row: dict[str, Any] = {
            "step": self.step,
            "loss": sums["loss"],
            "source": batches[0].source,
            "completion_len": sums["length"] / sums["samples"],
            "truncation_rate": sums["truncated"] / sums["samples"],
            "early_scored_share": sums["early"] / sums["samples"],  # rows handed off mid-rollout
            "tokens": int(num_items),
            "tokens_per_s": num_items / elapsed,
            "step_time": elapsed,
            **stage_metrics(self.timeline.close_step(step), elapsed),
            "grad_norm": update["grad_norm"],
            "lr": update["lr"],
            "skipped_steps": self.learner.skipped,
        }
        if self.corrector is not None and batches[0].source == "student":
            row.update(correction_metrics(batches, self.router, self.corrector.rate(step)))
        if self.config.run.max_staleness >= 1:
            row["async/staleness"] = (step - 1) - plan.version
            row["async/dropped_samples"] = self.dropped_samples
            weighted = sum(s.importance_tokens for s in stats)
            if weighted:
                row["async/importance_weight"] = sum(s.importance_sum for s in stats) / weighted
        if sums["entropy"]:
            row["student_entropy"] = sums["entropy"] / num_items
        for key in sorted(k.removeprefix("tokens/") for k in sums if k.startswith("tokens/")):
            row[f"divergence/{key}"] = sums[f"divergence/{key}"] / max(1.0, sums[f"tokens/{key}"])
        for name in sorted(k.removeprefix("routed/") for k in sums if k.startswith("routed/")):
            row[f"token_share/teacher/{name}"] = sums[f"routed/{name}"] / max(1.0, num_items)
            if f"entropy/{name}" in sums:
                row[f"entropy/teacher/{name}"] = sums[f"entropy/{name}"] / max(1.0, sums[f"routed/{name}"])
        return row

    @contextlib.contextmanager
    def run_ahead(self) -> Iterator[None]:
        """Async mode (``run.max_staleness >= 1``): a rollout producer for the block; otherwise nothing."""
        c = self.config
        if c.run.max_staleness < 1:
            yield
            return
        producer_threads, learner_threads = split_threads(c.run.threads or torch.get_num_threads())
        with main_threads(learner_threads), RolloutProducer(
                self.roll_out, self.student, start=self.step, last=c.optim.steps, max_staleness=c.run.max_staleness,
                threads=producer_threads) as self.producer:
            try:
                yield
            finally:
                self.producer = None

    # -- bookkeeping ----------------------------------------------------------------------------
    def sample_records(self, n: int) -> list[SampleRecord]:
        """The first ``n`` completions of the last step, with their reward and mean per-token divergence."""
        batches, stats = self.last_step
        rows = [(p, text, length, div) for b, s in zip(batches, stats, strict=True)
                for p, text, length, div in zip(b.prompts, b.completions, b.completion_lengths(),
                                                s.per_sample_divergence, strict=True)]
        return [SampleRecord(self.step, p.domain, prompt_text(p.prompt), text, p.reference or "",
                             self.verifiers(p.domain, p.prompt, text, p.reference or ""), div, length)
                for p, text, length, div in rows[:n]]

    def save(self) -> Path:
        """Checkpoint the step, written by rank 0 (every rank calls it: a sharded student's state is gathered
        first); in async mode with the producer paused, its in-flight samples counted as dropped for a resumed
        run (they are not saved)."""
        with self.producer.paused() if self.producer is not None else contextlib.nullcontext():
            weights, optimizer = self.sharding.full_state(self.student, self.learner.optimizer)
            learner = self.learner.state_dict()
            if optimizer is not None:  # the gathered one-process form of a sharded optimizer's state
                learner["optimizer"] = optimizer
            in_flight = 0 if self.producer is None else self.producer.in_flight_samples
            state = {"learner": learner, "sampler": self.source.state_dict(),
                     "mix_rng": self.mix_rng.getstate(), "rewards": self.rewards.state_dict(),
                     "rng": rng_state(self.generator), "dropped_samples": self.dropped_samples,
                     **({} if self.corrector is None else {"correction_rng": self.corrector.generator.get_state()}),
                     "in_flight_samples": in_flight, **self.run_info}
            return self.dp.on_main(lambda: save_checkpoint(self.config.run.out_dir, self.step, self.student, state,
                                                           self.config.checkpoint.keep, config_to_dict(self.config),
                                                           weights))

    def evaluate(self) -> dict[str, float]:
        c = self.config
        examples = load_examples(c.data, "eval", c.eval.num_prompts, c.run.seed)
        self.router.check(sorted({ex.domain for ex in examples}))
        # Evaluation must not perturb the training RNG streams (resume exactness).
        with torch.random.fork_rng(devices=[]), self.sharding.gathered():
            return evaluate(self.student, self.teachers, self.router, examples, c.rollout, self.verifiers,
                            sampled=c.eval.sampled, seed=c.run.seed, chat_template=c.data.chat_template)

    def run_eval(self, signals: StopSignals) -> dict[str, float] | None:
        """An evaluation (``None`` when a signal stops it): rank 0's alone, or with a sharded model every rank's,
        each running the same one so that their sharded forwards pair up (a signal then waits for its end)."""
        if not self.sharding.any:
            return self.dp.on_main(lambda: signals.evaluate(self.evaluate))
        return None if self.dp.any(signals.stop.is_set()) else self.evaluate()


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run (or with ``resume`` continue) training; ``overwrite`` replaces a previous run in ``run.out_dir``;
    ``stop_after`` ends early after that step, checkpointed."""
    preflight.check_config(config)
    with data_parallel(config) as dp, torch_threads(config.run.threads):
        return _train(config, resume, overwrite, stop_after, dp)


def _final_eval(trainer: Trainer, logger: MetricsLogger, signals: StopSignals, start: int) -> dict[str, float]:
    """The end-of-run evaluation, logged; a resumed run that had already finished reuses its recorded one."""
    recorded = trainer.dp.on_main(lambda: logger.recorded_eval(trainer.step)) if trainer.step == start else None
    final = recorded if recorded is not None else trainer.run_eval(signals)
    if final is not None and recorded is None:
        logger.log({"step": trainer.step, "kind": "eval", **final}, advance=False)
    return final or {}


def _train(config: RunConfig, resume: bool, overwrite: bool, stop_after: int | None,
           dp: DataParallel) -> dict[str, Any]:
    """The loop; in a data-parallel run every rank runs it, rank 0 alone writing the run's files
    (see ``distributed``)."""
    out = Path(config.run.out_dir)
    begin = run_dir.open_run(config, resume=resume, overwrite=overwrite)
    trainer = Trainer(config, begin.checkpoint, begin.state, dp)
    preflight.check_lengths(config, trainer.student, trainer.teachers, trainer.source.pool)
    trainer.run_info = {"run_id": begin.run_id, "schedule": run_dir.apply_resumed_optim(trainer.learner, config, begin)}
    run_id = dp.on_main(lambda: begin.run_id)  # a new run's id is drawn per rank: rank 0's names the run
    trainer.run_info["run_id"] = run_id
    dp.on_main(lambda: run_dir.record_config(config, begin, trainer.step))  # after every rank read the directory
    c, start = config, trainer.step
    logger = (MetricsLogger(out, c.optim.steps, start, c.metrics, RunIdentity(run_id, out.name, config_to_dict(c)))
              if dp.is_main else SilentLogger())
    last_ckpt, eval_results, interrupted, row = begin.checkpoint, {}, False, {}
    tokens, t0 = 0, time.perf_counter()
    if dp.is_main:
        trainer.timeline.open(out, start)
    try:
        with stop_on_signals() as signals, trainer.run_ahead():
            while trainer.step < c.optim.steps:
                row = trainer.train_step()
                if trainer.step == start + 1:
                    preflight.check_weights_finite(trainer.student, trainer.step)
                tokens += row["tokens"]
                logger.log(row)
                if c.metrics.samples_every and trainer.step % c.metrics.samples_every == 0:
                    logger.log_samples(trainer.sample_records(c.metrics.samples_per_step))
                at_end = trainer.step == c.optim.steps
                if c.checkpoint.every and trainer.step % c.checkpoint.every == 0 and not at_end:
                    last_ckpt = trainer.save()
                if c.eval.every and trainer.step % c.eval.every == 0 and not at_end:
                    periodic = trainer.run_eval(signals)
                    if periodic is not None:
                        logger.log({"step": trainer.step, "kind": "eval", **periodic}, advance=False)
                interrupted = dp.any(signals.stop.is_set())  # a signal to any rank stops all after this step
                if interrupted or (stop_after is not None and trainer.step >= stop_after):
                    break
            elapsed = time.perf_counter() - t0
            if trainer.step > start:
                last_ckpt = trainer.save()
            if trainer.step == c.optim.steps and c.eval.at_end:
                eval_results = _final_eval(trainer, logger, signals, start)
            interrupted = dp.any(signals.stop.is_set())
    finally:
        logger.close()
        trainer.timeline.close()
    steps_done = trainer.step - start
    return {
        "steps": trainer.step,
        "steps_run": steps_done,
        "final_loss": row.get("loss"),
        "steps_per_s": steps_done / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "skipped_steps": trainer.learner.skipped,
        "run_dir": str(out),
        "checkpoint": None if last_ckpt is None else str(last_ckpt),
        "eval": eval_results,
        "interrupted": interrupted,
    }
