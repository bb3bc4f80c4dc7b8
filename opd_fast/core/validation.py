"""Argument checking of the fused losses: the public arguments in, a validated ``LossCall`` out.

One place decides what a legal call looks like, so the reference, the chunked-torch path, the
native CPU kernel and the Triton kernels all reject the same inputs with the same messages.
Every error names the argument and the sizes/dtypes it saw. ``kl_call``, ``topk_call`` and
``logprobs_call`` read the public functions' arguments by name (their ``locals()``), so each
signature is written once, in the public function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .call import (
    BACKEND_NAMES,
    DIVERGENCES,
    REDUCTIONS,
    TAILS,
    TOPK_PAD_ID,
    HardLabelArgs,
    Head,
    HeadSpec,
    LossCall,
    LossOptions,
    SampledTokens,
    TeacherHead,
    TopKTeacher,
    Tuning,
    VocabShard,
)
from .engine import accum_dtype


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
    if bias is not None:
        _check_float(f"{prefix}bias", bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{prefix}bias must have shape ({weight.shape[0]},) to match {prefix}weight, "
                f"got {_shape(bias)}"
            )
    return weight.shape[0], weight.shape[1]


def compute_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Head:
    """The head in one compute dtype, since one GEMM reads hidden states and weight.

    Under autocast, fp32 tensors take autocast's dtype; otherwise the LM head follows the hidden
    states (an fp32 master head meeting bf16 activations is what mixed-precision training gives).
    The cast is differentiable, so a master weight still gets its gradient in its own dtype.
    DTensor operands (FSDP2, tensor parallel) are gathered here, once per call, differentiably.
    """
    from ..distributed.dtensor import gathered

    hidden, weight, bias = gathered(hidden), gathered(weight), gathered(bias)
    device = hidden.device.type
    dtype = hidden.dtype
    if torch.is_autocast_enabled(device) and dtype == torch.float32:
        dtype = torch.get_autocast_dtype(device)
    return Head(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


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
    shard: VocabShard | None = None,
) -> int:
    """Check the tensors of both heads; return the number of vocabulary entries compared.

    With ``shard`` the weights are vocabulary shards: both heads' vocabulary is the shards' whole.
    """
    v_s, _ = _check_head("student_", student_hidden, student_weight, student_bias)
    v_t, _ = _check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias)
    if shard is not None:
        v_s = v_t = shard.total
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
        counted = token_weights if mask is None else token_weights[mask]
        if bool((counted < 0).any()):  # a negative weight would turn "mean" into an unnormalized sum
            raise ValueError(f"token_weights must be >= 0 on counted tokens, got a minimum of {float(counted.min()):g}")
    return mask, token_weights


def validate_teacher_lse(
    teacher_lse: torch.Tensor | None, leading: tuple[int, ...], device: torch.device, mask: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Check a given teacher log-sum-exp (leading shape, floating, finite where counted); detached, in ``dtype``."""
    if teacher_lse is None:
        return None
    if not isinstance(teacher_lse, torch.Tensor):
        raise TypeError(f"teacher_lse must be a torch.Tensor, got {type(teacher_lse).__name__}")
    if tuple(teacher_lse.shape) != leading:
        raise ValueError(f"teacher_lse must have the leading shape {leading} of the hidden states, got "
                         f"{_shape(teacher_lse)}")
    if not teacher_lse.is_floating_point():
        raise ValueError(f"teacher_lse must be floating point, got dtype {teacher_lse.dtype}")
    if teacher_lse.device != device:
        raise ValueError(f"teacher_lse is on {teacher_lse.device} but the hidden states are on {device}")
    teacher_lse = teacher_lse.detach()
    counted = teacher_lse if mask is None else teacher_lse[mask]
    if not bool(torch.isfinite(counted).all()):
        raise ValueError("teacher_lse must be finite on counted tokens (a log-sum-exp of finite logits); got "
                         f"{int((~torch.isfinite(counted)).sum())} non-finite value(s)")
    return teacher_lse.to(dtype)


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
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    _check_positive("temperature", temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a scalar, got a tensor of shape {_shape(num_items)}")
            num_items = float(num_items.item())
        if not isinstance(num_items, (int, float)) or isinstance(num_items, bool) or not math.isfinite(num_items) \
                or num_items <= 0:
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


# ---- top-k teacher and per-token log-prob losses ------------------------------------------------

def _check_ids(name: str, ids: torch.Tensor, leading: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if tuple(ids.shape[: len(leading)]) != leading:
        raise ValueError(f"{name} must start with the leading shape {leading}, got {_shape(ids)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the hidden states are on {device}")


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
    # Rounded log-probs may sum a little above one (each entry up to ``tol`` high); more is not a distribution.
    limit = math.log1p(ids.shape[-1] * tol + 1e-3)
    if bool((mass > limit).any()):
        row = int((mass > limit).nonzero()[0])
        raise ValueError(
            f"teacher_topk_logprobs of counted row {row} sum to a probability of {float(mass[row].exp()):.4g} > 1 "
            f"(rounding allowance {math.expm1(limit):.2g}): top-k log-probs must come from one distribution"
        )
    if bool((needs_mass & torch.isneginf(mass)).any()):
        raise ValueError(
            "teacher_topk_logprobs are all -inf on a token whose top-k is renormalized (tail='renormalize', or "
            "ids covering the whole vocabulary): its teacher distribution is empty"
        )


# ---- the calls -------------------------------------------------------------------------------


def _backend_and_tuning(args: Mapping[str, Any], shard: VocabShard | None = None) -> tuple[Any, Tuning]:
    backend, tuning = args.get("backend", "reference"), args.get("tuning")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if shard is not None and backend not in ("auto", "torch"):
        raise ValueError(f"backend={backend!r} has no vocabulary-parallel engine: with process_group the loss runs "
                         "the sharded torch engine, so pass backend='auto' or 'torch'")
    if tuning is not None and not isinstance(tuning, Tuning):
        raise TypeError(f"tuning must be an opd_fast.Tuning, got {type(tuning).__name__}")
    return backend, tuning or Tuning()


def _common(args: Mapping[str, Any]) -> float | None:
    """``validate_common`` on a divergence call's arguments; returns ``num_items`` as a float."""
    return validate_common(beta=args["beta"], temperature=args["temperature"], reduction=args["reduction"],
                           num_items=args["num_items"], divergence=args["divergence"])


def _options(args: Mapping[str, Any], num: float | None, student: HeadSpec, teacher: HeadSpec, vocab: int,
             hard_weight: float = 0.0) -> LossOptions:
    return LossOptions(
        divergence=args["divergence"],
        beta=float(args["beta"]),
        temperature=float(args["temperature"]),
        temperature_sq_scaling=bool(args["temperature_sq_scaling"]),
        reduction=args["reduction"],
        num_items=num,
        student=student,
        teacher=teacher,
        vocab_size=vocab,
        hard_weight=hard_weight,
    )


def _check_compared(shard: VocabShard | None, vocab: int) -> None:
    """Every rank must hold some of the compared vocabulary (its sweep would have no columns otherwise)."""
    if shard is None:
        return
    idle = [r for r in range(len(shard.rows_per_rank)) if shard.compared(vocab, r) == 0]
    if idle:
        raise ValueError(f"vocab_size={vocab} leaves rank(s) {idle} without compared rows (shard rows per rank "
                         f"{list(shard.rows_per_rank)}): shard only the compared vocabulary, or use fewer ranks")


def _on_group(args: Mapping[str, Any], weights: tuple[str, ...], hidden: str,
              build: Callable[[Mapping[str, Any], VocabShard | None], LossCall]) -> LossCall:
    """``build(args, None)``, or, with a ``process_group``, the call every rank of the group agrees on."""
    group = args.get("process_group")
    if group is None:
        return build(args, None)
    from ..distributed.layout import agreed_call

    return agreed_call(group, {name: args[name] for name in weights}, args[hidden], lambda shard: build(args, shard))


def kl_call(args: Mapping[str, Any]) -> LossCall:
    """Validate the arguments of ``fused_linear_kl`` (by name) into a ``LossCall``."""
    return _on_group(args, ("student_weight", "teacher_weight"), "student_hidden", _kl_call)


def _kl_call(args: Mapping[str, Any], shard: VocabShard | None) -> LossCall:
    hs, ws, bs = args["student_hidden"], args["student_weight"], args["student_bias"]
    ht, wt, bt = args["teacher_hidden"], args["teacher_weight"], args["teacher_bias"]
    num = _common(args)
    k = validate_heads(hs, ws, ht, wt, bs, bt, args["vocab_size"], shard)
    _check_compared(shard, k)
    leading = tuple(hs.shape[:-1])
    mask, token_weights = validate_token_tensors(leading, hs.device, args["mask"], args["token_weights"])
    labels = args["labels"]
    hard_weight = validate_labels(labels, args["hard_weight"], args["ignore_index"], leading, hs.device, mask, k)
    student = validate_head_spec("student_", args["student_logit_scale"], args["student_softcap"])
    teacher = validate_head_spec("teacher_", args["teacher_logit_scale"], args["teacher_softcap"])
    backend, tuning = _backend_and_tuning(args, shard)
    teacher_lse = validate_teacher_lse(args["teacher_lse"], leading, hs.device, mask, accum_dtype(hs.dtype))
    return LossCall(
        student=compute_head(hs, ws, bs),
        teacher=TeacherHead(compute_head(ht.detach(), wt.detach(), None if bt is None else bt.detach()), teacher_lse),
        options=_options(args, num, student, teacher, k, hard_weight),
        backend=backend,
        return_stats=bool(args["return_stats"]),
        tuning=tuning,
        mask=mask,
        token_weights=token_weights,
        hard=None if labels is None else HardLabelArgs(labels, args["ignore_index"]),
        shard=shard,
    )


def topk_call(args: Mapping[str, Any]) -> LossCall:
    """Validate the arguments of ``fused_linear_kl_topk`` (by name) into a ``LossCall``.

    The top-k values are checked on the counted tokens only (masked tokens are never read).
    """
    return _on_group(args, ("student_weight",), "student_hidden", _topk_call)


def _topk_call(args: Mapping[str, Any], shard: VocabShard | None) -> LossCall:
    hs, ws, bs = args["student_hidden"], args["student_weight"], args["student_bias"]
    ids, logprobs, tail = args["teacher_topk_ids"], args["teacher_topk_logprobs"], args["tail"]
    num = _common(args)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    v_s, _ = _check_head("student_", hs, ws, bs)
    leading = tuple(hs.shape[:-1])
    _check_ids("teacher_topk_ids", ids, leading, hs.device)
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
    if logprobs.device != hs.device:
        raise ValueError(f"teacher_topk_logprobs is on {logprobs.device} but the hidden states are on {hs.device}")
    mask, token_weights = validate_token_tensors(leading, hs.device, args["mask"], args["token_weights"])
    vocab = resolve_vocab(v_s if shard is None else shard.total, None, args["vocab_size"])
    _check_compared(shard, vocab)
    logprobs = logprobs.detach()
    counted = (ids, logprobs) if mask is None else (ids[mask], logprobs[mask])
    validate_topk_values(*(t.reshape(-1, ids.shape[-1]) for t in counted), vocab, tail)
    student = validate_head_spec("student_", args["student_logit_scale"], args["student_softcap"])
    backend, tuning = _backend_and_tuning(args, shard)
    return LossCall(
        student=compute_head(hs, ws, bs),
        teacher=TopKTeacher(ids, logprobs, tail),
        options=_options(args, num, student, HeadSpec(), vocab),  # the teacher arrives as log-probs: no head
        backend=backend,
        return_stats=bool(args["return_stats"]),
        tuning=tuning,
        mask=mask,
        token_weights=token_weights,
        shard=shard,
    )


def logprobs_call(args: Mapping[str, Any]) -> LossCall:
    """Validate the arguments of ``fused_linear_logprobs`` (by name) into a ``LossCall``."""
    return _on_group(args, ("weight",), "hidden", _logprobs_call)


def _logprobs_call(args: Mapping[str, Any], shard: VocabShard | None) -> LossCall:
    hidden, weight, bias, token_ids = args["hidden"], args["weight"], args["bias"], args["token_ids"]
    vocab, _ = _check_head("", hidden, weight, bias)
    vocab = vocab if shard is None else shard.total
    spec = validate_head_spec("", args["logit_scale"], args["softcap"])
    _check_positive("temperature", args["temperature"])
    leading = tuple(hidden.shape[:-1])
    _check_ids("token_ids", token_ids, leading, hidden.device)
    if token_ids.dim() != len(leading):
        raise ValueError(f"token_ids must have the leading shape {leading} of hidden, got {_shape(token_ids)}")
    if token_ids.numel() and not (int(token_ids.min()) >= 0 and int(token_ids.max()) < vocab):
        raise ValueError(
            f"token_ids must be in [0, {vocab}), got values in [{int(token_ids.min())}, {int(token_ids.max())}]"
        )
    backend, tuning = _backend_and_tuning(args, shard)
    options = LossOptions(
        divergence="forward_kl", beta=0.0, temperature=float(args["temperature"]), temperature_sq_scaling=False,
        reduction="none", num_items=None, student=spec, teacher=HeadSpec(), vocab_size=vocab,
    )
    return LossCall(
        student=compute_head(hidden, weight, bias),
        teacher=SampledTokens(token_ids),
        options=options,
        backend=backend,
        return_stats=bool(args["return_entropy"]),
        tuning=tuning,
        shard=shard,
    )
