"""Data-parallel training: ``torchrun --nproc-per-node N -m opd_fast.cli train CONFIG``.

``train`` detects a torchrun environment (``WORLD_SIZE`` > 1) and joins the process group (gloo for
``run.device = "cpu"``, nccl for CUDA, ``LOCAL_RANK`` picking the GPU). The design keeps every rank's
state identical except its rollouts, so a data-parallel step computes the gradient of the same global
batch as one process:

- Prompts: every rank keeps the same ``PromptSource`` (same seed), draws the same global step batch and
  takes its contiguous slice of whole prompt groups (``data.prompts_per_step`` must divide by the world
  size), so group-relative advantages stay local. The per-sample divergences the adaptive sampler feeds on
  are all-gathered in rank order (= the global batch order), so every rank's sampler makes the same draws.
- Loss: every term is divided by the *global* completion-token count (and the SFT term by the global
  reference-token count), all-reduced before learning, so the sum of the ranks' gradients is the
  one-process gradient. The student's gradients are summed by one all-reduce per step, after gradient
  accumulation and before clipping, rather than by ``DistributedDataParallel``: DDP reduces on every
  backward (micro-batch) unless told not to, and it needs every forward to go through its wrapper, while the
  student also decodes rollouts and is checkpointed through the Hugging Face model; an explicit reduction
  of the accumulated gradient is one collective per step and leaves the model untouched. A non-finite loss
  on any rank skips the step on every rank.
- Strategy (``run.parallel``): "ddp" replicates the student (the explicit gradient all-reduce above); "fsdp"
  shards it with FSDP2, whose backward reduce-scatters (sums) the gradients, so the step only agrees on
  finiteness (``agree_finite``). Teachers are replicated unless ``teachers.NAME.shard`` (see ``sharding``).
- Rollout RNG: rank 0's generator is seeded exactly as in one process; rank ``r > 0`` derives its own from
  ``(run.seed, r, step)``. Checkpoints store rank 0's generator only; a resume (on any world size the config
  allows) restores it on rank 0 and re-derives the others from the resumed step.
- Files: metrics, samples, timeline, checkpoints, config records and evaluations are written by rank 0;
  metric rows report global sums and means. Stops (signals, ``stop_after``) are agreed each step: any rank
  stopping stops every rank after the same step.

Not supported with more than one process, refused with an error naming the key: async rollouts
(``run.max_staleness``), reward models (``loss.reward_models``, whose running per-domain standardization
would drift apart across ranks) and teacher-corrected rollouts (``rollout.correction``, whose generator and
metrics are per process); and what sharding cannot do: ``student.lora`` with "fsdp", a sharded teacher that
generates off-policy completions (see ``sharding``).

Public API: ``DataParallel``, ``data_parallel`` (context manager), ``check_config``, ``rank_seed``,
``world_from_env``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .config import RunConfig

T = TypeVar("T")


def world_from_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` of a torchrun environment; ``(1, 0, 0)`` outside one."""
    return (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
            int(os.environ.get("LOCAL_RANK", 0)))


def check_config(config: RunConfig, world_size: int) -> None:
    """Refuse, before any collective (so every rank raises the same error, none hangs), what a run of
    ``world_size`` processes cannot do."""
    if world_size <= 1:
        return
    d = config.data
    if d.prompts_per_step % world_size:
        raise ValueError(
            f"config key 'data.prompts_per_step' = {d.prompts_per_step} does not divide by the world size "
            f"{world_size}: each rank takes whole prompt groups of the step's {d.prompts_per_step} x "
            f"{d.group_size} samples (data.group_size); use a multiple of {world_size}"
        )
    if config.run.max_staleness >= 1:
        raise ValueError(f"config key 'run.max_staleness' = {config.run.max_staleness}: async rollouts are not "
                         f"supported with {world_size} processes; set it to 0 or run one process")
    if config.loss.reward_models:
        raise ValueError(f"config key 'loss.reward_models' is not supported with {world_size} processes (its "
                         "running per-domain standardization is per process); use verifiers or run one process")
    if config.rollout.correction is not None:
        raise ValueError(f"config key 'rollout.correction' is not supported with {world_size} processes (its "
                         "teacher-draw generator and corrected-token fractions are per process); run one process")
    if config.run.parallel == "fsdp" and config.student.lora is not None:
        raise ValueError("config key 'student.lora' is not supported with run.parallel = 'fsdp' (the adapter is a "
                         "small share of the weights: train it data parallel, run.parallel = 'ddp')")
    for name, teacher in config.teachers.items():
        if teacher.shard and config.loss.off_policy_fraction > 0 and config.loss.off_policy_source == "teacher":
            raise ValueError(f"config key 'teachers.{name}.shard' cannot be used with loss.off_policy_source = "
                             "'teacher': the ranks decode different numbers of tokens, so a sharded teacher's "
                             "all-gathers would not pair up")
    if config.run.device not in ("cpu", "cuda"):
        raise ValueError(f"config key 'run.device' = {config.run.device!r}: data parallel runs on 'cpu' (gloo) "
                         "or 'cuda' (nccl; LOCAL_RANK picks each rank's GPU)")


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The rollout generator's seed of ``rank`` from ``step`` on: ``seed`` itself on rank 0 (a one-process
    run's stream), a ``SeedSequence`` of ``(seed, rank, step)`` elsewhere (independent streams per rank, and
    a fresh one after a resume)."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the run (``world_size`` 1: a one-process run, where every method is a
    no-op) and the few collectives the trainer needs."""

    world_size: int = 1
    rank: int = 0
    device: str = "cpu"  # where collective tensors live: cpu for gloo, cuda for nccl

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[T]) -> list[T]:
        """This rank's contiguous share of the global step batch (its length divides by the world size)."""
        n = len(items) // self.world_size
        return items[self.rank * n:(self.rank + 1) * n]

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (fp64, so token counts stay exact)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any."""
        return self.sum(float(flag))[0] > 0

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (picklable data)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_step(self, indices: list[int], divergences: list[float],
                    sums: dict[str, float]) -> tuple[list[int], list[float], dict[str, float]]:
        """One collective per step: the sampler feedback (prompt index and mean per-token divergence of each
        sample) concatenated in rank order, which is the global batch's order, and the metric sums summed
        (a key missing on a rank, e.g. a teacher it did not use, counts 0 there)."""
        if self.world_size == 1:
            return indices, divergences, sums
        parts = self.gather((indices, divergences, sums))
        total: dict[str, float] = {}
        for _, _, part in parts:
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + value
        return [i for p in parts for i in p[0]], [d for p in parts for d in p[1]], total

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 once every rank got here, its result given to every rank; an exception there is
        raised on every rank (the others would otherwise wait for a result forever)."""
        if self.world_size == 1:
            return fn()
        dist.barrier()
        box: list[Any] = [None]
        failure: Exception | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # re-raised below, once the other ranks were told
                failure, box[0] = exc, ("error", f"{type(exc).__name__}: {exc}")
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if failure is not None:
            raise failure
        if kind == "error":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's weights on every rank (what DDP does at construction): same start, whatever the loader."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                buf = t.detach().to(self.device)
                dist.broadcast(buf, src=0)
                t.copy_(buf)

    def agree_finite(self, params: list[torch.Tensor], finite: bool) -> bool:
        """The gradient sync of a sharded student, whose gradients FSDP already summed in backward: whether every
        rank's loss was finite."""
        return not self.any(not finite)

    def sync_gradients(self, params: list[torch.Tensor], finite: bool) -> bool:
        """Sum the accumulated gradients over the ranks (one flat all-reduce per dtype); returns whether every
        rank's loss was finite (if not, nothing is reduced and every rank skips the step)."""
        if self.world_size == 1:
            return finite
        if self.any(not finite):
            return False
        for p in params:
            if p.grad is None:  # a rank whose batch did not reach this parameter still joins the sum
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
            dist.all_reduce(flat)
            for g, part in zip(grads, torch.split(flat, [g.numel() for g in grads]), strict=True):
                g.copy_(part.view_as(g))
        return True


@contextlib.contextmanager
def data_parallel(config: RunConfig) -> Iterator[DataParallel]:
    """The run's ``DataParallel``: joins the torchrun process group (and leaves it at the end) when
    ``WORLD_SIZE`` > 1 and none is initialized; uses the caller's group when one is."""
    world_size, rank, local_rank = world_from_env()
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    check_config(config, world_size)
    if world_size == 1:
        yield DataParallel()
        return
    cuda = config.run.device == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)  # "cuda" then means this rank's GPU everywhere
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield DataParallel(world_size, rank, "cuda" if cuda else "cpu")
    finally:
        if owned:
            dist.destroy_process_group()
