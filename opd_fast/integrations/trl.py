"""TRL's distillation trainers on the fused loss, with one line: ``use_opd_fast(trainer)``.

* ``DistillationTrainer`` computes its loss through TRL's chunked hidden-state divergence;
  ``chunked_divergence_loss`` is a drop-in with its arguments and results (loss, student entropy
  sum, valid-token count), and ``use_opd_fast`` routes the trainer's loss computation through it.
  Everything else the trainer does (generation, FSDP/DDP redirection, logit scales and softcaps
  read from the configs, DTensor heads) stays TRL's.
* ``GKDTrainer`` (``trl.experimental.gkd``) builds both models' full ``B x L x V`` logits and calls
  ``generalized_jsd_loss`` on them; ``use_opd_fast`` replaces its ``compute_loss`` with the same
  loss from the hidden states (``integrations.hf.distillation_loss``): no logits are materialized.

Both keep TRL's semantics: the generalized JSD with the trainer's ``beta`` (0 = forward KL,
1 = reverse KL), TRL's temperature handling and its normalization by the valid-token count or by
``num_items_in_batch``. The change is per trainer instance; nothing global is patched.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

from ..loss import fused_linear_kl
from .hf import distillation_loss

__all__ = ["chunked_divergence_loss", "use_opd_fast"]


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``distillation_trainer._chunked_divergence_loss`` on the fused loss (same arguments and results).

    Returns the loss (the summed per-token JSD over ``completion_mask``, divided by ``num_items_in_batch``
    or by the valid count), the summed per-token student entropy and the valid count.
    """
    mask = completion_mask != 0
    total, stats = fused_linear_kl(
        student_hidden_states, student_lm_head_weight, teacher_hidden_states, teacher_lm_head_weight,
        divergence="jsd", beta=float(beta), temperature=temperature, mask=mask, reduction="sum",
        student_bias=student_lm_head_bias, teacher_bias=teacher_lm_head_bias,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_final_logit_softcapping, teacher_softcap=teacher_final_logit_softcapping,
        return_stats=True,
    )
    n_valid = mask.sum()
    if num_items_in_batch is None:
        denominator = n_valid.clamp(min=1)  # an all-masked batch gives 0, not 0 / 0
    elif isinstance(num_items_in_batch, torch.Tensor):
        denominator = num_items_in_batch.to(total.device)
    else:
        denominator = num_items_in_batch
    return total / denominator, stats["student_entropy"].sum(), n_valid


@contextlib.contextmanager
def _module_function(module: types.ModuleType, name: str, replacement: Any):
    """``module.name`` is ``replacement`` inside the block only."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _distillation(trainer: Any) -> None:
    from trl.trainer import distillation_trainer

    tr_compute = trainer._compute_loss

    def _compute_loss(*args: Any, **kwargs: Any):
        with _module_function(distillation_trainer, "_chunked_divergence_loss", chunked_divergence_loss):
            return tr_compute(*args, **kwargs)

    trainer._compute_loss = _compute_loss


def _gkd_compute_loss(self: Any, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                      num_items_in_batch: torch.Tensor | int | None = None):
    """GKDTrainer.compute_loss from hidden states (its generalized JSD at temperature 1, masked by ``labels``)."""
    from trl.models.utils import _ForwardRedirection

    self.teacher_model.eval()
    student, teacher = self.accelerator.unwrap_model(model), self.accelerator.unwrap_model(self.teacher_model)
    # through the DDP/FSDP wrapper's forward (TRL's own redirection), so the wrapper syncs what it should
    loss = _ForwardRedirection()(
        model, student, distillation_loss, student, teacher, inputs["input_ids"], inputs["attention_mask"],
        inputs["labels"], divergence="jsd", beta=float(self.beta), num_items=num_items_in_batch,
    )
    return (loss, None) if return_outputs else loss


def use_opd_fast(trainer: Any) -> Any:
    """Make a TRL ``DistillationTrainer`` or ``GKDTrainer`` compute its loss with opd-fast; returns ``trainer``."""
    from trl import DistillationTrainer

    if isinstance(trainer, DistillationTrainer):
        _distillation(trainer)
        return trainer
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:  # a TRL without the experimental GKD trainer
        GKDTrainer = ()
    if isinstance(trainer, GKDTrainer):
        trainer.compute_loss = types.MethodType(_gkd_compute_loss, trainer)
        return trainer
    raise TypeError(f"use_opd_fast takes a trl DistillationTrainer or GKDTrainer, got {type(trainer).__name__}")
