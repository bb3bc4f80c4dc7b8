"""The losses users would pick instead of opd-fast, each called the way its project intends.

* naive torch: full logits, ``log_softmax`` in fp32, ``F.kl_div`` (what most trainers write);
* TRL's chunked hidden-state divergence (``DistillationTrainer``'s loss: token x vocabulary tiles
  projected from the hidden states, never the full logits), called through the function the
  trainer itself calls, with an all-ones completion mask;
* TRL's older ``generalized_jsd_loss`` (GKDTrainer) on full logits in the input dtype;
* Liger-Kernel's ``LigerFusedLinearJSDLoss`` (token-chunked, optionally ``torch.compile``d),
  soft loss only (``weight_hard_loss=0``, ``weight_soft_loss=1``).

TRL and Liger share opd-fast's ``beta`` convention (0 = forward KL, 1 = reverse KL) and mean over
tokens; ``correctness`` checks that claim against the reference before anything is timed.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .inputs import TEMPERATURE

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Where generalized_jsd_loss has lived across TRL releases (newest first).
_TRL_LOCATIONS = (
    "trl.experimental.gkd.gkd_trainer",
    "trl.experimental.gkd",
    "trl.trainer.gkd_trainer",
    "trl",
)


def peer_beta(divergence: str, beta: float) -> float | None:
    """The generalized-JSD ``beta`` expressing ``divergence``, or None when it cannot."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": beta}.get(divergence)


def naive_loss(divergence: str, beta: float) -> LossFn:
    """Full ``N x V`` logits, fp32 log-softmax, ``F.kl_div``, mean over tokens."""
    if divergence not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"naive supports forward_kl and reverse_kl, got divergence={divergence!r}")

    def loss(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        log_q = torch.log_softmax((hs @ ws.T).float() / TEMPERATURE, dim=-1)
        with torch.no_grad():
            log_p = torch.log_softmax((ht @ wt.T).float() / TEMPERATURE, dim=-1)
        if divergence == "forward_kl":  # F.kl_div(input, target) = KL(target || input)
            return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)

    return loss


def trl_generalized_jsd() -> Callable[..., torch.Tensor]:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` from wherever this TRL version keeps it."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its experimental-API warning, once per import
    errors = []
    for module_name in _TRL_LOCATIONS:
        try:
            trainer = importlib.import_module(module_name).GKDTrainer
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        return trainer.generalized_jsd_loss
    raise ImportError("TRL's GKDTrainer.generalized_jsd_loss not found (" + "; ".join(errors) + ")")


def trl_chunked_divergence() -> Callable[..., tuple[torch.Tensor, ...]]:
    """TRL's ``_chunked_divergence_loss`` (what ``DistillationTrainer.compute_loss`` calls)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        module = importlib.import_module("trl.trainer.distillation_trainer")
        return module._chunked_divergence_loss
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"TRL's chunked divergence (DistillationTrainer, TRL >= 1.16) not found: {exc}") from exc


def trl_chunked_loss(divergence: str, beta: float) -> LossFn:
    """TRL's chunked hidden-state divergence, mean over the (all valid) tokens."""
    b = peer_beta(divergence, beta)
    if b is None:
        raise ValueError(f"TRL's chunked divergence cannot express divergence={divergence!r}")
    divergence_loss = trl_chunked_divergence()

    def loss(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(1, hs.shape[0], dtype=torch.long, device=hs.device)
        value, _entropy_sum, _n_valid = divergence_loss(hs[None], ht[None], ws, wt, mask, b, temperature=TEMPERATURE)
        return value

    return loss


def trl_loss(divergence: str, beta: float) -> LossFn:
    """TRL's generalized JSD on full logits in the input dtype, ``batchmean`` over tokens."""
    b = peer_beta(divergence, beta)
    if b is None:
        raise ValueError(f"TRL's generalized_jsd_loss cannot express divergence={divergence!r}")
    jsd = trl_generalized_jsd()

    def loss(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = ht @ wt.T
        return jsd(hs @ ws.T, teacher_logits, beta=b, temperature=TEMPERATURE, reduction="batchmean")

    return loss


def liger_loss(divergence: str, beta: float, compiled: bool) -> LossFn:
    """Liger's fused linear JSD, soft loss only; labels are real token ids (none ignored)."""
    b = peer_beta(divergence, beta)
    if b is None:
        raise ValueError(f"Liger's LigerFusedLinearJSDLoss cannot express divergence={divergence!r}")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    module = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=b, temperature=TEMPERATURE, compiled=compiled
    )

    def loss(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        labels = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)
        return module(hs, ws, ht, wt, labels)

    return loss
