"""One end-to-end arm in a fresh process: train for a few steps, print per-step records and peak RSS as JSON.

Run as ``python -m opd_fast.benchmarking.e2e_worker '<json payload>'`` (built by ``e2e.run_arm``).
Every arm reports the same per-step record: ``wall_s`` (the optimizer step, end to end),
``tokens`` (generated tokens, up to and including EOS) and ``stages`` (seconds per stage, where the
trainer exposes them). TRL's steps are timed with a ``TrainerCallback``; its generated tokens and
generation time by wrapping the trainer's own generation method, leaving its behaviour unchanged.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .e2e import PROMPTS_FILE

if TYPE_CHECKING:
    from ..runner.config import RunConfig

MB = 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux reports KiB


def _prompts(root: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (root / PROMPTS_FILE).read_text().splitlines() if line.strip()]


def opd_fast_config(overrides: list[str], root: Path, out_dir: Path, c: dict[str, Any]) -> RunConfig:
    """The opd-fast arm's run config (written to ``out_dir/config.toml``) on the saved models under ``root``."""
    from ..runner.config import load_config

    prompts = out_dir / "prompts.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"], "reference": p["answer"]}) + "\n"
                               for p in _prompts(root)))
    toml = f"""
[run]
out_dir = "{out_dir / 'run'}"
seed = {c['seed']}
dtype = "float32"
threads = {c['threads']}
[student]
path = "{root / 'student'}"
[teachers.main]
path = "{root / 'teacher'}"
[data]
prompts = "{prompts}"
prompts_per_step = {c['batch_size']}
group_size = 1
chat_template = true
[rollout]
max_new_tokens = {c['max_new_tokens']}
temperature = 1.0
micro_batch_size = {c['batch_size']}
[loss]
divergence = "forward_kl"
[optim]
steps = {c['steps']}
lr = {c['lr']}
warmup_steps = 0
min_lr_ratio = 1.0
[checkpoint]
every = 0
[metrics]
progress = false
tensorboard = false
[eval]
at_end = false
"""
    path = out_dir / "config.toml"
    path.write_text(toml)
    return load_config(path, overrides)


def run_opd_fast(overrides: list[str], root: Path, out_dir: Path, c: dict[str, Any]) -> list[dict]:
    """``opd-fast train`` through its Python entry point; steps from the run's metrics.jsonl."""
    from ..runner.metrics import read_metrics
    from ..runner.trainer import train

    train(opd_fast_config(overrides, root, out_dir, c), overwrite=True)
    steps = []
    for row in read_metrics(out_dir / "run"):
        if row.get("kind") == "eval":
            continue
        stages = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("time/")}
        steps.append({"wall_s": row["step_time"], "tokens": row["tokens"], "stages": stages})
    return steps


class _StepClock:
    """Per-step wall time (a TrainerCallback) plus what the wrapped generation recorded in the step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._t0 = 0.0
        self.tokens = 0
        self.rollout_s = 0.0

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock._t0, clock.tokens, clock.rollout_s = time.perf_counter(), 0, 0.0

            def on_step_end(self, args, state, control, **kwargs):
                wall = time.perf_counter() - clock._t0
                stages = {"rollout": clock.rollout_s, "score + learn": wall - clock.rollout_s}
                clock.steps.append({"wall_s": wall, "tokens": clock.tokens, "stages": stages})

        return Clock()

    def timed(self, fn, count):
        """``fn`` wrapped: its time goes to the rollout stage, ``count(result)`` to the step's tokens."""

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.rollout_s += time.perf_counter() - t0
            self.tokens += int(count(out))
            return out

        return wrapper


def _common_args(c: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """TrainingArguments both TRL trainers share: fp32, no checkpointing of activations, no saving/logging."""
    return dict(output_dir=str(out_dir), per_device_train_batch_size=c["batch_size"], gradient_accumulation_steps=1,
                max_steps=c["steps"], learning_rate=c["lr"], lr_scheduler_type="constant", warmup_steps=0,
                gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, seed=c["seed"],
                report_to=[], save_strategy="no", logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0,
                temperature=1.0, beta=0.0)  # beta 0 = forward KL in both trainers


def _tokenizer_and_models(root: Path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(root / "student")
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype="float32")
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype="float32")
    return tok, student, teacher


def run_trl_gkd(root: Path, out_dir: Path, c: dict[str, Any]) -> list[dict]:
    """TRL's GKDTrainer, fully on-policy (lmbda=1), KV-cache generation (no gradient checkpointing)."""
    from datasets import Dataset

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok, student, teacher = _tokenizer_and_models(root)
    data = Dataset.from_list([{"messages": [{"role": "user", "content": p["prompt"]},
                                            {"role": "assistant", "content": p["answer"]}]} for p in _prompts(root)])
    args = GKDConfig(**_common_args(c, out_dir), lmbda=1.0, max_new_tokens=c["max_new_tokens"])
    clock = _StepClock()
    original = GKDTrainer.generate_on_policy_outputs
    GKDTrainer.generate_on_policy_outputs = staticmethod(clock.timed(original, lambda out: (out[2] != -100).sum()))
    try:
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                             processing_class=tok, callbacks=[clock.callback()])
        trainer.train()
    finally:
        GKDTrainer.generate_on_policy_outputs = staticmethod(original)
    return clock.steps


def run_trl_distill(root: Path, out_dir: Path, c: dict[str, Any]) -> list[dict]:
    """TRL's DistillationTrainer (on-policy, chunked hidden-state loss), transformers generation."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tok, student, teacher = _tokenizer_and_models(root)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}]} for p in _prompts(root)])
    args = DistillationConfig(**_common_args(c, out_dir), max_completion_length=c["max_new_tokens"], use_vllm=False)
    clock = _StepClock()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  processing_class=tok, callbacks=[clock.callback()])
    trainer._generate_and_score_completions = clock.timed(trainer._generate_and_score_completions,
                                                          lambda out: out["completion_mask"].sum())
    trainer.train()
    return clock.steps


def main(argv: list[str]) -> int:
    payload = json.loads(argv[0])
    arm, c = payload["arm"], payload["config"]
    root, out_dir = Path(payload["root"]), Path(payload["out_dir"])
    import torch

    torch.set_num_threads(c["threads"])
    torch.manual_seed(c["seed"])
    if arm["kind"] == "opd-fast":
        steps = run_opd_fast(list(arm["overrides"]), root, out_dir, c)
    elif arm["kind"] == "trl-gkd":
        steps = run_trl_gkd(root, out_dir, c)
    else:
        steps = run_trl_distill(root, out_dir, c)
    print(json.dumps({"status": "ok", "steps": steps, "peak_rss_mb": _peak_rss_mb()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
