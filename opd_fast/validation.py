"""Argument checking shared by every backend of the fused divergence losses.

One place decides what a legal call looks like, so the reference, the chunked-torch
path, the native CPU kernel and the Triton kernels all reject the same inputs with the
same messages. Every error names the argument and the sizes/dtypes it saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class HeadSpec:
    """How one side (student or teacher) turns hidden states into logits.

    logits = softcap(scale * (h @ W[:vocab]^T + b[:vocab])) / temperature
    """

    scale: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class LossOptions:
    """Validated scalar options of a divergence loss (everything but the tensors)."""

    divergence: str
    beta: float
    temperature: float
    temperature_sq_scaling: bool
    reduction: str
    num_items: float | None
    student: HeadSpec
    teacher: HeadSpec
    vocab_size: int
    hard_weight: float = 0.0  # weight of the hard-label cross-entropy (fused_linear_kl with labels)

    @property
    def loss_scale(self) -> float:
        """Factor applied to every per-token value (T^2 when requested)."""
        return self.temperature**2 if self.temperature_sq_scaling else 1.0


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got dtype {t.dtype}")


def _check_head(
    prefix: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[int, int]:
    _check_float(f"{prefix}hidden", hidden)
    _check_float(f"{prefix}weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden must have shape (..., H), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must have shape (V, H), got shape {_shape(weight)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}hidden has hidden size {hidden.shape[-1]} but {prefix}weight has shape "
            f"{_shape(weight)} (expected (V, {hidden.shape[-1]}))"
        )
    if weight.dtype != hidden.dtype:  # one GEMM reads both
        raise ValueError(f"{prefix}hidden ({hidden.dtype}) and {prefix}weight ({weight.dtype}) must share a dtype")
    if bias is not None:
        _check_float(f"{prefix}bias", bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{prefix}bias must have shape ({weight.shape[0]},) to match {prefix}weight, "
                f"got {_shape(bias)}"
            )
    return weight.shape[0], weight.shape[1]


def _check_positive(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def validate_heads(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    vocab_size: int | None,
) -> int:
    """Check the tensors of both heads; return the number of vocabulary entries compared."""
    v_s, _ = _check_head("student_", student_hidden, student_weight, student_bias)
    v_t, _ = _check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden and teacher_hidden must share their leading shape, got "
            f"{_shape(student_hidden)} and {_shape(teacher_hidden)}"
        )
    named = {
        "student_hidden": student_hidden,
        "student_weight": student_weight,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
        "student_bias": student_bias,
        "teacher_bias": teacher_bias,
    }
    devices = {k: t.device for k, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {seen}")
    return resolve_vocab(v_s, v_t, vocab_size)


def resolve_vocab(v_s: int, v_t: int | None, vocab_size: int | None) -> int:
    """The compared vocabulary: both head sizes, or the first ``vocab_size`` entries."""
    if vocab_size is None:
        if v_t is not None and v_s != v_t:
            raise ValueError(
                f"student vocab size {v_s} != teacher vocab size {v_t}; pass vocab_size=K to compare "
                "the first K entries of both heads (e.g. padded heads)"
            )
        return v_s
    smallest = v_s if v_t is None else min(v_s, v_t)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 1 <= vocab_size <= smallest:
        raise ValueError(
            f"vocab_size must be an int in [1, {smallest}] (student vocab {v_s}"
            + ("" if v_t is None else f", teacher vocab {v_t}")
            + f"), got {vocab_size!r}"
        )
    return vocab_size


def validate_token_tensors(
    leading: tuple[int, ...],
    device: torch.device,
    mask: torch.Tensor | None,
    token_weights: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check ``mask`` / ``token_weights`` against the leading shape; return them normalized."""
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != leading:
            raise ValueError(f"mask must have the leading shape {leading}, got {_shape(mask)}")
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(
                f"mask must be bool (True = token counts), got dtype {mask.dtype}; "
                "use token_weights for fractional weights"
            )
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but the hidden states are on {device}")
        mask = mask.bool()
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor):
            raise TypeError(f"token_weights must be a torch.Tensor, got {type(token_weights).__name__}")
        if tuple(token_weights.shape) != leading:
            raise ValueError(
                f"token_weights must have the leading shape {leading}, got {_shape(token_weights)}"
            )
        if not token_weights.is_floating_point():
            raise ValueError(f"token_weights must be floating point, got dtype {token_weights.dtype}")
        if token_weights.device != device:
            raise ValueError(f"token_weights is on {token_weights.device} but the hidden states are on {device}")
    return mask, token_weights


def validate_common(
    *,
    beta: float,
    temperature: float,
    reduction: str,
    num_items: float | torch.Tensor | None,
    divergence: str | None = None,
) -> float | None:
    """Check the options shared by all losses; return ``num_items`` as a float (or None)."""
    if divergence is not None and divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    _check_positive("temperature", temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a scalar, got a tensor of shape {_shape(num_items)}")
            num_items = float(num_items.item())
        if not isinstance(num_items, (int, float)) or not math.isfinite(num_items) or num_items <= 0:
            raise ValueError(f"num_items must be a finite number > 0, got {num_items!r}")
        num_items = float(num_items)
    return num_items


def validate_labels(
    labels: torch.Tensor | None,
    hard_weight: float,
    ignore_index: int,
    leading: tuple[int, ...],
    device: torch.device,
    mask: torch.Tensor | None,
    vocab: int,
) -> float:
    """Check the hard-label arguments of ``fused_linear_kl``; return ``hard_weight`` as a float.

    Label values are checked on the counted tokens only (masked tokens are never read).
    """
    if not isinstance(hard_weight, (int, float)) or isinstance(hard_weight, bool) or not math.isfinite(hard_weight) \
            or hard_weight < 0:
        raise ValueError(f"hard_weight must be a finite number >= 0, got {hard_weight!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if labels is None:
        if hard_weight != 0:
            raise ValueError(f"hard_weight={hard_weight!r} needs labels (ground-truth ids of shape {leading})")
        return 0.0
    _check_ids("labels", labels, leading, device)
    if labels.dim() != len(leading):
        raise ValueError(f"labels must have the leading shape {leading} of the hidden states, got {_shape(labels)}")
    counted = labels if mask is None else labels[mask]
    bad = (counted != ignore_index) & ((counted < 0) | (counted >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, {vocab}) (the compared vocabulary) or ignore_index={ignore_index}, got "
            f"{int(counted[bad][0])}"
        )
    return float(hard_weight)


def validate_head_spec(prefix: str, scale: float, softcap: float | None) -> HeadSpec:
    """Check one head's logit scale and softcap; ``prefix`` names the arguments ("student_", "")."""
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
        raise ValueError(f"{prefix}logit_scale must be a finite non-zero number, got {scale!r}")
    _check_positive(f"{prefix}softcap", softcap, allow_none=True)
    return HeadSpec(scale=float(scale), softcap=None if softcap is None else float(softcap))


def validate_kl_call(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    divergence: str,
    beta: float,
    temperature: float,
    temperature_sq_scaling: bool,
    mask: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    reduction: str,
    num_items: float | torch.Tensor | None,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    student_logit_scale: float,
    teacher_logit_scale: float,
    student_softcap: float | None,
    teacher_softcap: float | None,
    vocab_size: int | None,
    labels: torch.Tensor | None = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
) -> tuple[LossOptions, torch.Tensor | None, torch.Tensor | None]:
    """Validate a ``fused_linear_kl`` call; return (options, mask, token_weights) normalized."""
    num = validate_common(
        beta=beta, temperature=temperature, reduction=reduction, num_items=num_items, divergence=divergence
    )
    k = validate_heads(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, vocab_size
    )
    leading = tuple(student_hidden.shape[:-1])
    mask, token_weights = validate_token_tensors(leading, student_hidden.device, mask, token_weights)
    hard = validate_labels(labels, hard_weight, ignore_index, leading, student_hidden.device, mask, k)
    options = LossOptions(
        divergence=divergence,
        beta=float(beta),
        temperature=float(temperature),
        temperature_sq_scaling=bool(temperature_sq_scaling),
        reduction=reduction,
        num_items=num,
        student=validate_head_spec("student_", student_logit_scale, student_softcap),
        teacher=validate_head_spec("teacher_", teacher_logit_scale, teacher_softcap),
        vocab_size=k,
        hard_weight=hard,
    )
    return options, mask, token_weights


# ---- top-k teacher and per-token log-prob losses ------------------------------------------------

TAILS = ("bucket", "renormalize")
TOPK_PAD_ID = -1  # a top-k slot holding this id is padding: it is ignored, whatever its log-prob


def _check_ids(name: str, ids: torch.Tensor, leading: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if tuple(ids.shape[: len(leading)]) != leading:
        raise ValueError(f"{name} must start with the leading shape {leading}, got {_shape(ids)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the hidden states are on {device}")


def validate_topk_call(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    divergence: str,
    beta: float,
    temperature: float,
    temperature_sq_scaling: bool,
    tail: str,
    mask: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    reduction: str,
    num_items: float | torch.Tensor | None,
    student_bias: torch.Tensor | None,
    student_logit_scale: float,
    student_softcap: float | None,
    vocab_size: int | None,
) -> tuple[LossOptions, torch.Tensor | None, torch.Tensor | None]:
    """Validate the shapes and options of a ``fused_linear_kl_topk`` call (values: ``validate_topk_values``)."""
    num = validate_common(
        beta=beta, temperature=temperature, reduction=reduction, num_items=num_items, divergence=divergence
    )
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    v_s, _ = _check_head("student_", student_hidden, student_weight, student_bias)
    leading = tuple(student_hidden.shape[:-1])
    ids, logprobs = teacher_topk_ids, teacher_topk_logprobs
    _check_ids("teacher_topk_ids", ids, leading, student_hidden.device)
    if ids.dim() != len(leading) + 1:
        raise ValueError(f"teacher_topk_ids must have shape (*{leading}, k), got {_shape(ids)}")
    _check_float("teacher_topk_logprobs", logprobs)
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs has shape {_shape(logprobs)} but teacher_topk_ids has shape {_shape(ids)}: "
            "both must be (*leading, k) with the same k"
        )
    if ids.shape[-1] < 1:
        raise ValueError(f"k (the last dimension of teacher_topk_ids) must be >= 1, got shape {_shape(ids)}")
    if logprobs.device != student_hidden.device:
        raise ValueError(f"teacher_topk_logprobs is on {logprobs.device} but the hidden states are on "
                         f"{student_hidden.device}")
    mask, token_weights = validate_token_tensors(leading, student_hidden.device, mask, token_weights)
    options = LossOptions(
        divergence=divergence,
        beta=float(beta),
        temperature=float(temperature),
        temperature_sq_scaling=bool(temperature_sq_scaling),
        reduction=reduction,
        num_items=num,
        student=validate_head_spec("student_", student_logit_scale, student_softcap),
        teacher=HeadSpec(),  # the teacher arrives as log-probs: no head
        vocab_size=resolve_vocab(v_s, None, vocab_size),
    )
    return options, mask, token_weights


def logprob_tolerance(dtype: torch.dtype) -> float:
    """How far above 0 a teacher log-prob may sit from rounding (it is then clamped to 0)."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


def validate_topk_values(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int, tail: str) -> None:
    """Check the values of the counted tokens' top-k rows, ``(n, k)`` (masked tokens are never read)."""
    if ids.numel() == 0:
        return
    valid = ids != TOPK_PAD_ID
    if bool(((ids < TOPK_PAD_ID) | (ids >= vocab)).any()):
        raise ValueError(
            f"teacher_topk_ids must be in [0, {vocab}) or {TOPK_PAD_ID} (padding), got values in "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    if bool((torch.isnan(logprobs) & valid).any()):
        raise ValueError("teacher_topk_logprobs must not be NaN (padding slots, id -1, may hold anything)")
    worst = float(logprobs.masked_fill(~valid, float("-inf")).max())
    tol = logprob_tolerance(logprobs.dtype)
    if worst > tol:
        raise ValueError(
            f"teacher_topk_logprobs must be log-probabilities <= 0 (rounding tolerance {tol:g} for "
            f"{logprobs.dtype}), got a maximum of {worst:g}"
        )
    ordered = ids.sort(-1).values
    repeats = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != TOPK_PAD_ID)
    if bool(repeats.any()):
        row = int(repeats.any(-1).nonzero()[0])
        raise ValueError(f"teacher_topk_ids must not repeat an id within a token's top-k; counted row {row} "
                         f"has {ids[row].tolist()}")
    n_valid = valid.sum(-1)
    needs_mass = (n_valid > 0) & ((n_valid == vocab) | (tail == "renormalize"))
    mass = torch.logsumexp(logprobs.double().masked_fill(~valid, float("-inf")), -1)
    if bool((needs_mass & torch.isneginf(mass)).any()):
        raise ValueError(
            "teacher_topk_logprobs are all -inf on a token whose top-k is renormalized (tail='renormalize', or "
            "ids covering the whole vocabulary): its teacher distribution is empty"
        )


def validate_logprobs_call(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float,
    bias: torch.Tensor | None,
    logit_scale: float,
    softcap: float | None,
) -> HeadSpec:
    """Validate a ``fused_linear_logprobs`` call; return its head spec."""
    vocab, _ = _check_head("", hidden, weight, bias)
    spec = validate_head_spec("", logit_scale, softcap)
    _check_positive("temperature", temperature)
    leading = tuple(hidden.shape[:-1])
    _check_ids("token_ids", token_ids, leading, hidden.device)
    if token_ids.dim() != len(leading):
        raise ValueError(f"token_ids must have the leading shape {leading} of hidden, got {_shape(token_ids)}")
    if token_ids.numel() and not (int(token_ids.min()) >= 0 and int(token_ids.max()) < vocab):
        raise ValueError(
            f"token_ids must be in [0, {vocab}), got values in [{int(token_ids.min())}, {int(token_ids.max())}]"
        )
    return spec
