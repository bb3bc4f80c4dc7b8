"""``distillation_loss`` on two HF models equals the divergence of their materialized logits."""

from __future__ import annotations

import pytest
import torch

from opd_fast.integrations.hf import distillation_loss
from opd_fast.reference import divergence_from_logits


def _naive(student, teacher, batch, divergence: str, hard_weight: float) -> torch.Tensor:
    """The same loss from both models' full logits (shifted, masked by the labels)."""
    z_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        z_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    per_token = divergence_from_logits(z_s[mask], z_t[mask], divergence)
    ce = torch.nn.functional.cross_entropy(z_s[mask], targets[mask])
    return per_token.mean() + hard_weight * ce


@pytest.mark.parametrize(("divergence", "hard_weight"), [("forward_kl", 0.0), ("reverse_kl", 0.0), ("tvd", 0.5)])
def test_equals_materialized_logits(models, batch, divergence: str, hard_weight: float) -> None:
    student, teacher = models
    results = []
    for fn in (lambda: distillation_loss(student, teacher, batch["input_ids"], batch["attention_mask"],
                                         batch["labels"], divergence=divergence, hard_weight=hard_weight),
               lambda: _naive(student, teacher, batch, divergence, hard_weight)):
        student.zero_grad()
        loss = fn()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for got, want in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(got, want)


def test_without_labels_counts_attended_targets(models, batch) -> None:
    student, teacher = models
    ids, attention = batch["input_ids"], batch["attention_mask"]
    from_mask = distillation_loss(student, teacher, ids, attention, reduction="sum")
    labels = ids.masked_fill(attention == 0, -100)
    torch.testing.assert_close(from_mask, distillation_loss(student, teacher, ids, attention, labels, reduction="sum"))
