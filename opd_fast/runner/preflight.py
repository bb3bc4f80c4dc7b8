"""Start-up checks: a run that cannot finish fails before its first step, with an error naming the problem.

``check_config`` runs before any model is loaded (device, backend, dtype, model and tokenizer files,
evaluation prompts); ``check_lengths`` runs once the tokenizers and model configs are loaded (prompts
that do not fit the models' positions would silently run past RoPE's trained range or crash in an
embedding lookup); ``check_weights_finite`` runs after the first optimizer step, because a student
that breaks there (e.g. an unstable dtype) would otherwise only be noticed at the first checkpoint.

Public API: ``check_config``, ``check_lengths``, ``check_weights_finite``, ``TOKENIZER_FILES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.dispatch import availability
from ..tasks import Example
from .config import RunConfig
from .data import encode_prompt, load_examples
from .hub import model_directory
from .models import LoadedModel, Teacher

# Any of these makes a directory loadable by a transformers tokenizer class.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def _device(config: RunConfig) -> torch.device:
    try:
        device = torch.device(config.run.device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"config key 'run.device' = {config.run.device!r} is not a torch device: {exc}") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"config key 'run.device' = {config.run.device!r}: this machine has {count} CUDA "
                             "device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"config key 'run.device' = {config.run.device!r}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"config key 'run.device' = {config.run.device!r}: the runner supports cpu, cuda, mps")
    return device


def _model_dir(key: str, role: str, path: str, revision: str, local_files_only: bool) -> None:
    directory = Path(model_directory(path, revision=revision, local_files_only=local_files_only,
                                     label=f"config key {key!r} ({role})"))
    if not (directory / "config.json").is_file():
        raise ValueError(f"config key {key!r}: the {role} model directory {directory} has no config.json")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"config key {key!r}: the {role} model directory {directory} has no tokenizer files "
                         f"(expected one of {', '.join(TOKENIZER_FILES)})")


def check_config(config: RunConfig, *, training: bool = True, student_dir: bool = True) -> None:
    """Everything that can be checked without loading a model; errors name the config key.

    ``student_dir=False`` skips ``student.path`` (evaluating a full checkpoint does not read it)."""
    c = config
    if training and c.student.dtype == "float16":
        raise ValueError(
            "config key 'student.dtype' = 'float16' would train the student's weights in pure fp16: AdamW's eps and "
            "small updates underflow and the weights turn NaN/inf within a step. Use 'float32' (the default) or "
            "'bfloat16'"
        )
    if training and c.run.dtype == "float16":
        raise ValueError(
            "config key 'run.dtype' = 'float16' would compute the student's gradients in fp16 without loss scaling, "
            "which the runner does not do: small gradients underflow to zero. Use 'bfloat16' or 'float32'"
        )
    device = _device(c)
    if c.loss.backend != "auto":
        ok, reason = availability(c.loss.backend, device)
        if not ok:
            raise ValueError(f"config key 'loss.backend' = {c.loss.backend!r} is unusable on {device}: {reason}")
    if student_dir:
        _model_dir("student.path", "student", c.student.path, c.student.revision, c.student.local_files_only)
    for name, t in c.teachers.items():
        _model_dir(f"teachers.{name}.path", f"teacher {name!r}", t.path, t.revision, t.local_files_only)
    evaluates = c.eval.at_end or c.eval.every > 0
    if training and evaluates and not c.data.task:
        if not c.data.eval_prompts:
            raise ValueError("config key 'data.eval_prompts' must be set: the run evaluates (eval.at_end / "
                             "eval.every) and has no data.task to draw evaluation prompts from")
        if not Path(c.data.eval_prompts).exists():
            raise ValueError(f"config key 'data.eval_prompts': no file or dataset directory {c.data.eval_prompts}")


def check_lengths(config: RunConfig, student: LoadedModel, teachers: dict[str, Teacher],
                  prompts: Sequence[Example]) -> None:
    """Every training (and evaluation) prompt plus ``rollout.max_new_tokens`` fits every model's positions."""
    c = config
    limits = {f"the student ({student.path})": getattr(student.decoder.config, "max_position_embeddings", None)}
    for name, t in teachers.items():
        limits[f"teacher {name!r} ({t.model.path})"] = getattr(t.model.decoder.config, "max_position_embeddings", None)
    known = {who: n for who, n in limits.items() if isinstance(n, int)}
    if not known:
        return
    who, limit = min(known.items(), key=lambda kv: kv[1])
    train_source = "data.prompts" if not c.data.task else f"task {c.data.task!r}"
    texts = [(train_source, prompts[i].prompt) for i in range(len(prompts))]
    if c.eval.at_end or c.eval.every > 0:
        evals = load_examples(c.data, "eval", c.eval.num_prompts, c.run.seed)
        texts += [("data.eval_prompts" if not c.data.task else f"task {c.data.task!r} (eval)", ex.prompt)
                  for ex in evals]
    for source, text in texts:
        need = len(encode_prompt(student.tokenizer, text, c.data.chat_template)) + c.rollout.max_new_tokens
        if need > limit:
            raise ValueError(
                f"a prompt of {source} ({text[:40]!r}...) needs {need} positions with rollout.max_new_tokens="
                f"{c.rollout.max_new_tokens}, more than the {limit} that {who} has (max_position_embeddings); "
                "shorten the prompts or lower rollout.max_new_tokens"
            )


def check_weights_finite(student: LoadedModel, step: int) -> None:
    """Raise naming the first trainable parameter that is NaN/inf after ``step``."""
    for name, p in student.model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise RuntimeError(
                f"the student's parameter {name!r} is non-finite after step {step}: the optimizer broke the "
                "weights (check run.dtype, optim.lr, optim.grad_clip); stopping before wasting the run"
            )
