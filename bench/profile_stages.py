"""Where a training step's stage time goes: rollout, score and learn alone, on the end-to-end benchmark's setup.

    .venv/bin/python bench/profile_stages.py [--vocab 512 32000] [--threads 1] [--repeats 5] [--top 8]
                                             [--cache-dir runs/bench-e2e-models] [--json out.json]

The models, prompts and config are ``opd-fast bench e2e``'s (``benchmarking/e2e.py`` saves the random Llama
teacher 256 x 4 and student 128 x 2; ``e2e_worker.opd_fast_config`` writes the run config: batch 8, 32 new
tokens, forward KL, fp32). One ``Trainer`` per vocabulary; each repeat runs, interleaved so that a shared
machine's drift hits them alike:

- ``rollout``: one micro-batch's rollout with ``rollout.handoff_fraction`` 0 (every row decodes to the end)
  and 0.25 (finished rows leave the decode batch), each from the same generator state;
- ``score``: the teacher's scoring of that batch (``score``): its forward and the gather of the target states;
- ``learn``: ``Learner.micro_step`` on the scored batch (student forward, fused loss, backward), gradients
  dropped after each;
- ``step serial`` / ``step strict handoff=0.25``: one whole ``Trainer.train_step`` of two trainers built
  alike: ``run.pipeline = "serial"`` (what the default strict mode runs with one micro-batch per step), and
  strict with ``rollout.handoff_fraction = 0.25`` (the teachers prefill the prompts on the worker thread
  while the student decodes, and rows that finish early leave the decode batch and are scored there too).
  They compute the same thing, so they stay in step. The random models rarely end a row before the budget;
  ``--stop`` strings (applied to both arms) make rows end early, as a trained model's EOS does.

Medians with min-max in ms, the share of rows handed off early, the batch's shape and real-token share, a
FLOP estimate (2 x tokens x decoder parameters for a forward, x3 with the backward; the fused loss: both heads
forward, the student's backward, on the completion tokens only) and with
``--top`` torch.profiler's top ops by self CPU time of one run per stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from opd_fast.benchmarking.e2e import E2EConfig, prepare
from opd_fast.benchmarking.e2e_worker import opd_fast_config
from opd_fast.runner.rollout import RolloutBatch, rollout
from opd_fast.runner.score import score
from opd_fast.runner.trainer import Trainer


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _params(model: torch.nn.Module) -> int:
    """Parameters a token multiplies by in the decoder (embedding lookups excluded)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embed)


def _top_ops(fn: Callable[[], object], count: int) -> list[str]:
    with torch.profiler.profile() as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    return [f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ms x{e.count}" for e in events]


def profile_vocab(vocab: int, args: argparse.Namespace) -> dict:
    cfg = E2EConfig(cache_dir=args.cache_dir, threads=args.threads)
    root = prepare(cfg, vocab)
    out = Path(tempfile.mkdtemp(prefix=f"stages_v{vocab}_"))
    c = {"seed": cfg.seed, "threads": args.threads, "batch_size": cfg.batch_size,
         "max_new_tokens": cfg.max_new_tokens, "steps": cfg.steps, "lr": cfg.lr}
    trainer = Trainer(opd_fast_config([], root, out, c))
    stop = [f"rollout.stop={json.dumps(args.stop)}"] if args.stop else []
    arms = {"serial": ['run.pipeline="serial"'],
            "strict handoff=0.25": ['run.pipeline="strict"', "rollout.handoff_fraction=0.25"]}
    steppers = {name: Trainer(opd_fast_config([*overrides, *stop], root, out / str(i), c))
                for i, (name, overrides) in enumerate(arms.items())}
    prompts = trainer.source.next_batch()
    rc = trainer.config.rollout
    state = trainer.generator.get_state()

    def roll(handoff: float) -> RolloutBatch:
        trainer.generator.set_state(state)
        return rollout(trainer.student, prompts, rc, trainer.generator, chat_template=True, handoff=handoff)

    batch = roll(0.0)
    teacher = trainer.teachers["main"]
    scored = score(batch, trainer.teachers, trainer.router)
    num_items = float(batch.num_tokens)

    def learn() -> None:
        with trainer.student.autocast():
            trainer.learner.micro_step(scored, num_items)
        trainer.learner.optimizer.zero_grad(set_to_none=True)

    step_rows: dict[str, list[dict]] = {name: [] for name in steppers}
    stages: dict[str, Callable[[], object]] = {
        "rollout handoff=0": lambda: roll(0.0),
        "rollout handoff=0.25": lambda: roll(0.25),
        "score": lambda: score(batch, trainer.teachers, trainer.router),
        "learn": learn,
        **{f"step {name}": (lambda s=stepper, rows=step_rows[name]: rows.append(s.train_step()))
           for name, stepper in steppers.items()},
    }
    for fn in stages.values():  # warm-up: first-call allocations and kernel selection
        fn()
    times: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(args.repeats):
        for name, fn in stages.items():
            times[name].append(_ms(fn))
    tokens = batch.input_ids.numel()
    teacher_width, student_width = teacher.head.weight.shape[1], trainer.student.head.weight.shape[1]
    result = {
        "vocab": vocab, "threads": args.threads, "repeats": args.repeats, "stop": args.stop,
        "batch_shape": list(batch.input_ids.shape), "real_token_share": float(batch.attention_mask.float().mean()),
        "completion_tokens": batch.num_tokens, "early_rows": roll(0.25).early_rows,
        "step_early_share": statistics.mean(r["early_scored_share"] for r in step_rows["strict handoff=0.25"]),
        "gflop": {"score": 2 * tokens * _params(teacher.model.decoder) / 1e9,
                  "learn": 6 * tokens * _params(trainer.student.decoder) / 1e9,
                  "loss": 2 * batch.num_tokens * vocab * (teacher_width + 3 * student_width) / 1e9},
        "ms": {name: _spread(values) for name, values in times.items()},
    }
    if args.top:
        result["top_ops"] = {name: _top_ops(fn, args.top) for name, fn in stages.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[512, 32000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=8, help="profiler top ops per stage (0 = no profile)")
    parser.add_argument("--cache-dir", default="runs/bench-e2e-models")
    parser.add_argument("--stop", nargs="*", default=[], help="rollout.stop strings for the step arms")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [profile_vocab(v, args) for v in args.vocab]
    for r in results:
        print(f"vocab {r['vocab']}: batch {r['batch_shape']} ({r['real_token_share']:.0%} real tokens), "
              f"{r['completion_tokens']} completion tokens, {r['early_rows']} rows handed off early, "
              f"{r['step_early_share']:.0%} of the steps' rows scored early, "
              "GFLOP " + ", ".join(f"{k} {v:.2f}" for k, v in r["gflop"].items()))
        for name, s in r["ms"].items():
            print(f"  {name:<22} {s['median']:8.1f} ms ({s['min']:.1f}-{s['max']:.1f})")
            for op in r.get("top_ops", {}).get(name, []):
                print(f"      {op}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
