"""``opd-fast generate MODEL_DIR --prompt TEXT ...``: sample completions with the runner's sampler."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..runner.config import RolloutConfig
    from ..runner.data import Prompt
    from ..runner.models import load_model
    from ..runner.rollout import rollout

    lm = load_model(args.model, name="model", dtype=args.dtype, device=args.device)
    cfg = RolloutConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, stop=args.stop, micro_batch_size=len(args.prompt))
    generator = torch.Generator(args.device).manual_seed(args.seed)
    batch = rollout(lm, [Prompt(i, p, "default", None) for i, p in enumerate(args.prompt)], cfg, generator)
    for prompt, text, cut in zip(args.prompt, batch.completions, batch.truncated, strict=True):
        print(f"{prompt!r} -> {text!r}" + (" [truncated]" if cut else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="sample completions from a model directory (e.g. a checkpoint)")
    parser.add_argument("model", help="model directory (a checkpoint's student/ works)")
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
