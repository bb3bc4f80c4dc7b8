"""FSDP2 sharding of the student (``run.parallel = "fsdp"``) and of frozen teachers (``teachers.NAME.shard``).

Both use ``torch.distributed.fsdp.fully_shard``: every decoder layer (the model's ``_no_split_modules``) is one
unit, and the root unit holds the embeddings, the final norm and the LM head. The runner never calls a causal
LM's ``forward`` (that would form logits); it calls the decoder and reads the head itself. So the root is
``HiddenStates``, a module that owns the whole causal LM and whose ``forward`` is the decoder's: asking for
hidden states runs the root's all-gather, and the head the loss then reads is the all-gathered parameter,
whose gradient FSDP reduce-scatters with the rest. So the learner reads the head after the forward: a head
read while sharded would be a DTensor, which the loss accepts, but its gradient would be this rank's alone,
never summed over the ranks.

Student (training): fp32 master weights sharded; with ``run.dtype`` lower than the master dtype,
``MixedPrecisionPolicy`` all-gathers the parameters in ``run.dtype`` and reduce-scatters gradients in the
master dtype. Gradients are summed, not averaged (``set_gradient_divide_factor(1)``): every loss term is
already divided by the global token count, so the sum is the one-process gradient. Layers reshard after
forward; the root keeps the head gathered through backward (resharded after it). Every rank runs
backward even on a non-finite loss (the reduce-scatters are collectives); the step is then skipped on every
rank, as in DDP.

Rollouts and evaluations decode with the student *gathered* (``Sharding.gathered``): one all-gather of the
whole model before, none per token, resharded after. Each rank stops decoding when its own samples end, so a
sharded decode, with one all-gather per layer per token, would pair collectives of different steps across
ranks. The price is the student's full weights in ``run.dtype`` on every rank while it decodes (2 bytes per
parameter in bf16), on top of its sharded state.

Teachers (``shard = true``): forward only, the layers resharded after forward. The root (embeddings, final norm,
head) stays gathered from the first forward on, as it never goes through a backward: the loss reads the head on
the ranks that have rows for the teacher, which a DTensor head would turn into a collective the others never
join. Each sharded teacher has its own process group, because the strict pipeline scores on a worker thread
while the main thread runs the student's collectives: two threads must not share one group. Every rank must run
each sharded forward the others run: scoring visits the teachers in the config's order on every rank, and a rank
with no rows for a sharded teacher in a micro-batch joins with a one-token forward (``join_forward``). A sharded
teacher must not generate (``loss.off_policy_source = "teacher"``: ranks decode different numbers of tokens),
which ``distributed.check_config`` refuses.

Checkpoints keep the one-process format: full state dicts gathered to rank 0 on CPU
(``get_model_state_dict`` / ``get_optimizer_state_dict``, ``full_state_dict=True, cpu_offload=True``), the
optimizer state keyed by parameter index as ``torch.optim`` writes it. Resuming loads the full weights on every
rank and shards them, and ``set_optimizer_state_dict`` shards the full optimizer state, so a run resumes on any
world size and under either strategy.

Public API: ``Sharding``, ``to_shard``, ``shard_run``, ``is_sharded``, ``join_forward``, ``HiddenStates``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .config import RunConfig
from .models import DTYPES, LoadedModel, Teacher, _cache_kwarg, decoder_of


class HiddenStates(nn.Module):
    """The FSDP root of a sharded causal LM: owns the whole model, and its ``forward`` is the decoder's (final
    hidden states), so the root's all-gather runs whenever the runner asks for hidden states."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def config(self) -> Any:
        """The decoder's config, which callers of a decoder read (e.g. its position limit)."""
        return decoder_of(self.lm).config

    def forward(self, *args: Any, cache: Any = None, **kwargs: Any) -> Any:
        decoder = decoder_of(self.lm)
        if cache is not None:  # the decoder's own name for it (it changed across transformers versions)
            kwargs[_cache_kwarg(type(decoder))] = cache
        return decoder(*args, **kwargs)


def _layers(lm: LoadedModel) -> list[nn.Module]:
    """The decoder layers, by the classes the model declares unsplittable (``_no_split_modules``, what Hugging
    Face's own device maps and FSDP wrapping policies cut along)."""
    classes = set(getattr(lm.model, "_no_split_modules", None) or ())
    layers = [m for m in lm.model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"{lm.name} ({lm.path}): cannot shard it: its model class declares no decoder layer "
                         f"classes (_no_split_modules = {sorted(classes)}), found none of them in the model")
    return layers


@dataclass
class _Sharded:
    """One sharded model's FSDP units: its layers, then the root (which never reshards after forward)."""

    units: list[FSDPModule]

    def set_resharding(self, on: bool) -> None:
        """Whether the layers reshard after forward (the root never does)."""
        for unit in self.units[:-1]:
            unit.set_reshard_after_forward(on, recurse=False)

    def reshard(self) -> None:
        for unit in self.units:
            unit.reshard()


def _shard(lm: LoadedModel, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy) -> _Sharded:
    units = [fully_shard(layer, mesh=mesh, mp_policy=mp_policy) for layer in _layers(lm)]
    # the root keeps the head gathered after forward: the loss reads it there, on the ranks with rows for it
    root = fully_shard(HiddenStates(lm.model), mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    units.append(root)
    for unit in units:  # losses are divided by the global token count: the gradients must be summed
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # sum and no pre-scaling (gloo has no PREMUL_SUM)
        # a parameter this rank's batch did not reach still joins the reduce-scatter (as zeros): the ranks'
        # collectives must match whatever their data
        unit.set_reduce_scatter_unused_params(True, recurse=False)
    lm.decoder = root
    return _Sharded(units)


@dataclass
class Sharding:
    """What a run shards (nothing outside ``run.parallel = "fsdp"`` and ``teachers.NAME.shard``, or with one
    process) and the operations that differ when it does."""

    student: _Sharded | None = None
    teachers: dict[str, _Sharded] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        """Some model's forward is a collective: evaluations must then run on every rank."""
        return self.student is not None or bool(self.teachers)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """The student's full weights on every rank for the block (decoding: no collective per token). Only
        forwards belong inside: a backward there would reshard the layers it reduces, and the next forward
        would all-gather again, out of step across ranks."""
        s = self.student
        if s is None:
            yield
            return
        s.set_resharding(False)
        for unit in s.units:
            unit.unshard()
        try:
            yield
        finally:
            s.set_resharding(True)
            s.reshard()

    def full_state(self, student: LoadedModel, optimizer: torch.optim.Optimizer
                   ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
        """The student's full weights and optimizer state on rank 0's CPU (empty elsewhere), in the
        one-process formats; ``(None, None)`` when the student is not sharded. A collective: every rank calls it."""
        if self.student is None:
            return None, None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = _tie(student.model, get_model_state_dict(student.model, options=options))
        by_name = get_optimizer_state_dict(student.model, optimizer, options=options)
        index = {name: i for i, name in enumerate(_trainable_names(student.model))}
        optim = {"state": {index[name]: value for name, value in by_name.get("state", {}).items()},
                 "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                  for group in by_name.get("param_groups", [])]}
        return weights, optim

    def load_optimizer(self, student: LoadedModel, optimizer: torch.optim.Optimizer,
                       saved: dict[str, Any]) -> dict[str, Any]:
        """``saved`` (a one-process optimizer state, as every checkpoint holds it) as this optimizer's state:
        itself when the student is not sharded; else sharded into the optimizer, whose local state is returned."""
        if self.student is None:
            return saved
        names = _trainable_names(student.model)
        by_name = {"state": {names[i]: value for i, value in saved["state"].items()},
                   "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                    for group in saved["param_groups"]]}
        set_optimizer_state_dict(student.model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
        return optimizer.state_dict()


def is_sharded(lm: LoadedModel) -> bool:
    """Whether ``lm``'s forward is a collective (it was sharded by ``shard_run``)."""
    return isinstance(lm.decoder, HiddenStates)


@torch.no_grad()
def join_forward(lm: LoadedModel) -> None:
    """A one-token forward of a sharded model, on a rank with nothing for it in a micro-batch that other ranks
    run it on: each forward all-gathers the same units in the same order, so this one pairs with theirs."""
    token = torch.full((1, 1), lm.tokenizer.pad_token_id, device=lm.device)
    lm.decoder(input_ids=token, attention_mask=torch.ones_like(token))


def _tie(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gathered tensors of one tied parameter (a head tied to the embeddings) made one tensor again, so that
    ``save_pretrained`` writes it once, as it does for the live model."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        if canonical != name and name in weights:
            weights[name] = weights[canonical]
    return weights


def _trainable_names(model: nn.Module) -> list[str]:
    """Parameter names in the optimizer's order (the learner optimizes the trainable parameters in order)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def to_shard(config: RunConfig, world_size: int) -> set[str]:
    """The models a run of ``world_size`` processes shards: "student" and teacher names."""
    if world_size <= 1:
        return set()
    student = {"student"} if config.run.parallel == "fsdp" else set()
    return student | {name for name, t in config.teachers.items() if t.shard}


def shard_run(config: RunConfig, world_size: int, student: LoadedModel, teachers: dict[str, Teacher]) -> Sharding:
    """Shard what the config asks for (``to_shard``; the process group is initialized)."""
    names = to_shard(config, world_size)
    device = config.run.device
    sharding = Sharding()
    if "student" in names:
        master = student.head.weight.dtype
        compute = DTYPES[config.run.dtype]
        policy = MixedPrecisionPolicy(param_dtype=compute if compute != master else None, reduce_dtype=master)
        sharding.student = _shard(student, DeviceMesh.from_group(dist.group.WORLD, device), policy)
    for name, teacher in teachers.items():
        if name in names:
            group = dist.new_group(backend="nccl" if device == "cuda" else "gloo")
            mesh = DeviceMesh.from_group(group, device)
            sharding.teachers[name] = _shard(teacher.model, mesh, MixedPrecisionPolicy())
    return sharding
