"""``opd-fast generate MODEL --prompt TEXT ...``: sample completions with the runner's sampler.

MODEL is a model directory, a Hugging Face model id (read from the HF cache), a checkpoint directory,
or a run directory with ``--checkpoint latest`` (or a checkpoint's name). A checkpoint is loaded
as it was trained: its own ``config.json`` says whether ``student/`` is a full model or a LoRA adapter
on the configured base model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the runner is imported lazily, so that --help stays fast
    from ..runner.models import LoadedModel


def _load_student(args: argparse.Namespace) -> LoadedModel:
    from ..runner.checkpoint import STATE_JSON, find_checkpoint, load_config_json
    from ..runner.config import config_from_dict
    from ..runner.models import load_model

    model = Path(args.model)
    if args.checkpoint is None and not (model / STATE_JSON).is_file():
        if (model / "checkpoints").is_dir():
            raise ValueError(f"{model} is a run directory: pass --checkpoint latest (or a checkpoint's name)")
        return load_model(args.model, name="model", dtype=args.dtype, device=args.device)
    checkpoint = model if args.checkpoint is None else find_checkpoint(model, args.checkpoint)
    saved = load_config_json(checkpoint)
    student = config_from_dict(saved).student if saved is not None else None
    if student is None or student.lora is None:
        return load_model(str(checkpoint / "student"), name="student", dtype=args.dtype, device=args.device)
    return load_model(student.path, name="student", revision=student.revision,
                      local_files_only=student.local_files_only, dtype=args.dtype, device=args.device,
                      lora=student.lora, adapter_path=str(checkpoint / "student"))


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..runner.config import RolloutConfig
    from ..runner.data import Prompt
    from ..runner.rollout import rollout

    lm = _load_student(args)
    cfg = RolloutConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, stop=args.stop, micro_batch_size=len(args.prompt))
    generator = torch.Generator(args.device).manual_seed(args.seed)
    batch = rollout(lm, [Prompt(i, p, "default", None) for i, p in enumerate(args.prompt)], cfg, generator)
    for prompt, text, cut in zip(args.prompt, batch.completions, batch.truncated, strict=True):
        print(f"{prompt!r} -> {text!r}" + (" [truncated]" if cut else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="sample completions from a model, a checkpoint or a run's latest one")
    parser.add_argument("model", help="model directory, Hugging Face model id (HF cache), checkpoint directory, or "
                                      "run directory (with --checkpoint)")
    parser.add_argument("--checkpoint", default=None,
                        help="with a run directory as MODEL: 'latest' or a checkpoint name such as step-00000010")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=_run)
