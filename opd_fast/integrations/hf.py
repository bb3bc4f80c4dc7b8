"""The distillation loss of two Hugging Face causal LMs on a batch, from their hidden states.

What a custom loop or a ``transformers.Trainer.compute_loss`` needs: both models run their decoder
only (no ``B x L x V`` logits), and the fused loss meets the final hidden states with each model's
output head (its logit scale and softcap read from its config). Position ``t`` predicts token
``t + 1``, so the last position is dropped and ``labels`` are shifted, as the causal-LM heads of
``transformers`` do.

Example (``Trainer.compute_loss``)::

    class DistillTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = distillation_loss(model, teacher, inputs["input_ids"], inputs.get("attention_mask"),
                                     inputs.get("labels"), divergence="jsd", beta=0.5, num_items=num_items_in_batch)
            return (loss, None) if return_outputs else loss

Under DDP/FSDP, pass the *unwrapped* student from inside the wrapper's forward (the way TRL routes its
own loss through ``_forward_redirection``), so the wrapper sees the forward it syncs gradients for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..loss import fused_linear_kl
from ..runner.models import decoder_of, output_head

__all__ = ["distillation_loss", "hidden_states"]


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  **model_kwargs: Any) -> torch.Tensor:
    """The final hidden states ``(B, L, H)`` of a causal LM (its decoder only: no logits are formed)."""
    return decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).last_hidden_state


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    **loss_options: Any,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fused_linear_kl`` between ``student`` and ``teacher`` (no gradient) on the batch ``input_ids``.

    Args:
        labels: ``(B, L)`` causal-LM labels (``ignore_index`` where a token does not count, e.g. the
            prompt and padding): the loss counts the positions predicting a label. Without labels, the
            positions predicting an attended token (``attention_mask``) or every position count.
        loss_options: any ``fused_linear_kl`` option (``divergence``, ``beta``, ``temperature``,
            ``reduction``, ``num_items``, ``return_stats``, ``backend``...). With ``hard_weight`` the
            shifted labels are also the hard labels of the cross-entropy term.

    The models must share the vocabulary (or pass ``vocab_size``); their hidden sizes may differ.
    """
    if labels is not None:
        targets = labels[:, 1:]
    elif attention_mask is not None:
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    else:
        targets = input_ids[:, 1:]
    student_hidden = hidden_states(student, input_ids, attention_mask)[:, :-1]
    with torch.no_grad():
        teacher_hidden = hidden_states(teacher, input_ids, attention_mask)[:, :-1]
    s, t = output_head(student), output_head(teacher)
    if loss_options.get("hard_weight", 0.0):
        loss_options = {"labels": targets, "ignore_index": ignore_index, **loss_options}
    return fused_linear_kl(student_hidden, s.weight, teacher_hidden, t.weight,
                           mask=targets != ignore_index, **s.loss_kwargs("student"), **t.loss_kwargs("teacher"),
                           **loss_options)
