"""Where a rollout's time goes: interleaved A/B of the rollout's per-token changes, with profiles.

    .venv/bin/python bench/bench_rollout.py [--vocab 512 32000] [--batch 8] [--new-tokens 32] [--threads 2]
                                            [--repeats 5] [--profile] [--json out.json]
    .venv/bin/python bench/bench_rollout.py --model-dir runs/bench-e2e-models/v32000_t256x4_s128x2

Variants, cumulative, each the rollout of one batch with the same models, prompts and seed:

- ``before``: the earlier sampler (``torch.multinomial``, one exponential per vocabulary entry), the
  sampling head as ``h @ W.T`` and HF's decoder forward per token;
- ``+sampler``: inverse-CDF sampling (one uniform per row, no ``log_softmax`` pass);
- ``+head``: ``head_logits`` as shipped (weight-major for a few rows on CPU; no passes for a logit scale
  or temperature of 1);
- ``+fast``: the fast decode step (``rollout.decode = "fast"``): the library as shipped.

The first two replace the library's functions inside ``opd_fast.runner.rollout`` for their runs only
(``before`` runs at plain T=1 sampling, which is what the earlier sampler is reproduced for). Repeats
interleave the variants, so a shared machine's drift hits them alike; medians with min-max, and ms per
decode step (rollout time / steps run), split into stages (prefill, decode steps, sampling head,
sampler, the rest; medians over the same timed runs, the prefill spread over the steps). ``--profile``
adds torch.profiler's top ops (self CPU time) of one rollout per variant; ``--head-rows 1 8 16 32``
times the sampling head's two layouts alone. Without
``--model-dir`` the student is a random Llama built from a config (hidden 128 x 2 layers, 4 heads, as the
end-to-end benchmark's student) over a character tokenizer padded to ``--vocab``; with it,
``DIR/student`` and ``DIR/prompts.jsonl`` (chat template) are used.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from opd_fast.models.tiny import char_tokenizer, save_model, tiny_causal_lm
from opd_fast.runner import rollout as rollout_module
from opd_fast.runner.config import RolloutConfig
from opd_fast.runner.data import Prompt
from opd_fast.runner.models import Head, LoadedModel, load_model

VARIANTS = ("before", "+sampler", "+head", "+fast")


def multinomial_sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The earlier sampler at plain sampling (T=1, no top-k / top-p): ``torch.multinomial``."""
    if (temperature, top_k, top_p) != (1.0, 0, 1.0):
        raise ValueError("the 'before' variant reproduces the earlier sampler at plain T=1 sampling only")
    logp = torch.log_softmax(logits, -1)
    tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def nt_head_logits(hidden: torch.Tensor, head: Head, temperature: float = 1.0) -> torch.Tensor:
    """The earlier sampling head for a Llama head (no bias or softcap): ``h @ W.T``, then scale and temperature."""
    return (hidden.float() @ head.weight.float().T) * head.scale / temperature


@contextlib.contextmanager
def variant(name: str) -> Iterator[str]:
    """Patch the rollout module for ``name``'s runs; yield the ``rollout.decode`` mode it runs with."""
    patches: dict[str, Callable] = {}
    if name == "before":
        patches["sample_tokens"] = multinomial_sample
    if name in ("before", "+sampler"):
        patches["head_logits"] = nt_head_logits
    saved = {attr: getattr(rollout_module, attr) for attr in patches}
    for attr, fn in patches.items():
        setattr(rollout_module, attr, fn)
    try:
        yield "fast" if name == "+fast" else "hf"
    finally:
        for attr, fn in saved.items():
            setattr(rollout_module, attr, fn)


def build_student(vocab: int, root: Path) -> tuple[LoadedModel, list[Prompt], bool]:
    tok = char_tokenizer(vocab_size=vocab)
    save_model(tiny_causal_lm(tok, hidden_size=128, num_layers=2, num_heads=4, seed=0), tok, root / "student")
    texts = [f"What is {100 + 37 * i} + {50 + 11 * i}? Answer with the number only." for i in range(64)]
    return load_model(str(root / "student")), [Prompt(i, t, "d", None) for i, t in enumerate(texts)], False


def saved_student(model_dir: Path) -> tuple[LoadedModel, list[Prompt], bool]:
    lines = [json.loads(line) for line in (model_dir / "prompts.jsonl").read_text().splitlines() if line.strip()]
    prompts = [Prompt(i, row["prompt"], "d", None) for i, row in enumerate(lines)]
    return load_model(str(model_dir / "student")), prompts, True


def run_once(lm: LoadedModel, prompts: list[Prompt], cfg: RolloutConfig, chat: bool, mode: str) -> tuple[float, int]:
    """Seconds of one rollout, and its decode steps."""
    run_cfg = dataclasses.replace(cfg, decode=mode)
    start = time.perf_counter()
    batch = rollout_module.rollout(lm, prompts, run_cfg, torch.Generator().manual_seed(0), chat_template=chat)
    return time.perf_counter() - start, max(batch.completion_lengths())


class StageClock:
    """Wall time of a rollout's stages: the prefill, the model's decode steps, the sampling head, the
    sampler; the rest (prompt encoding, stop checks, bookkeeping, packing the batch) is the difference."""

    STAGES = ("prefill", "decode steps", "head", "sampler")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.STAGES, 0.0)

    def timed(self, stage: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[stage] += time.perf_counter() - start
            return out

        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved = {attr: getattr(rollout_module, attr) for attr in ("start_decode", "head_logits", "sample_tokens")}
        start = saved["start_decode"]

        def timed_start(*args, **kwargs):
            state, hidden = self.timed("prefill", start)(*args, **kwargs)
            state.step = self.timed("decode steps", state.step)
            return state, hidden

        rollout_module.start_decode = timed_start
        rollout_module.head_logits = self.timed("head", saved["head_logits"])
        rollout_module.sample_tokens = self.timed("sampler", saved["sample_tokens"])
        try:
            yield
        finally:
            for attr, fn in saved.items():
                setattr(rollout_module, attr, fn)


def stages_once(lm: LoadedModel, prompts: list[Prompt], cfg: RolloutConfig, chat: bool,
                mode: str) -> tuple[float, int, dict[str, float]]:
    """One timed rollout: seconds, decode steps, and ms per decode step of each stage (the prefill, once
    per rollout, spread over the steps too). The stage clocks add a few microseconds per step."""
    clock = StageClock()
    with clock.installed():
        total, steps = run_once(lm, prompts, cfg, chat, mode)
    ms = {stage: 1e3 * sec / steps for stage, sec in clock.seconds.items()}
    ms["rest"] = 1e3 * total / steps - sum(ms.values())
    return total, steps, ms


def profile_once(lm: LoadedModel, prompts: list[Prompt], cfg: RolloutConfig, chat: bool, mode: str,
                 top: int) -> list[dict[str, float | int | str]]:
    from torch.profiler import profile

    with profile() as prof:
        run_once(lm, prompts, cfg, chat, mode)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count} for e in events]


def bench_case(lm: LoadedModel, prompts: list[Prompt], chat: bool, args: argparse.Namespace) -> dict:
    cfg = RolloutConfig(max_new_tokens=args.new_tokens)
    batch = prompts[: args.batch]
    for name in args.variants:  # warm-up: first-call allocations, lazy inits
        with variant(name) as mode:
            run_once(lm, batch, cfg, chat, mode)
    times: dict[str, list[float]] = {name: [] for name in args.variants}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in args.variants}
    steps: dict[str, int] = {}
    for _ in range(args.repeats):
        for name in args.variants:
            with variant(name) as mode:
                seconds, steps[name], ms = stages_once(lm, batch, cfg, chat, mode)
            times[name].append(seconds)
            stages[name].append(ms)
    out = {}
    for name in args.variants:
        t = times[name]
        out[name] = {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "steps": steps[name],
                     "ms_per_step": 1e3 * statistics.median(t) / steps[name],
                     "stages_ms_per_step": {stage: round(statistics.median(r[stage] for r in stages[name]), 3)
                                            for stage in stages[name][0]}}
        if args.profile:
            with variant(name) as mode:
                out[name]["profile"] = profile_once(lm, batch, cfg, chat, mode, args.top)
    return out


def bench_head_layouts(vocab: int, hidden: int, rows: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """Milliseconds of the sampling head's product in both layouts per row count (medians, interleaved):
    the measurement behind ``WEIGHT_MAJOR_MAX_ROWS``."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=g)
    layouts = {"h @ W.T": lambda h: h @ weight.T, "(W @ h.T).T": lambda h: (weight @ h.T).T.contiguous()}
    out = {}
    for n in rows:
        h = torch.randn(n, hidden, generator=g)
        times: dict[str, list[float]] = {name: [] for name in layouts}
        for _ in range(repeats):
            for name, fn in layouts.items():
                fn(h)
                start = time.perf_counter()
                for _ in range(10):
                    fn(h)
                times[name].append((time.perf_counter() - start) / 10 * 1e3)
        out[str(n)] = {name: statistics.median(t) for name, t in times.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[512, 32000])
    parser.add_argument("--model-dir", type=Path, nargs="*", default=[],
                        help="saved models (DIR/student, DIR/prompts.jsonl) instead of --vocab")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--profile", action="store_true", help="torch.profiler top ops of one rollout per variant")
    parser.add_argument("--top", type=int, default=12, help="profiled ops to keep")
    parser.add_argument("--head-rows", type=int, nargs="*", default=[],
                        help="also time the sampling head's two layouts at these row counts (hidden 128)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "batch": args.batch, "new_tokens": args.new_tokens, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {str(d): lambda d=d: saved_student(d) for d in args.model_dir} or {
            f"vocab{v}": lambda v=v: build_student(v, Path(tmp) / f"v{v}") for v in args.vocab}
        for label, make in cases.items():
            lm, prompts, chat = make()
            results["cases"][label] = case = bench_case(lm, prompts, chat, args)
            print(f"\n{label}: batch {args.batch}, {args.new_tokens} new tokens, {args.threads} threads")
            for name, r in case.items():
                print(f"  {name:9s} {r['median_s'] * 1e3:8.1f} ms (min {r['min_s'] * 1e3:.1f}, max "
                      f"{r['max_s'] * 1e3:.1f})  {r['ms_per_step']:6.2f} ms/step over {r['steps']} steps")
                print("      ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_ms_per_step"].items()))
                for op in r.get("profile", []):
                    print(f"      {op['op'][:48]:48s} {op['self_ms']:9.2f} ms  x{op['calls']}")
    if args.head_rows:
        results["head_layouts"] = {}
        for v in args.vocab:
            results["head_layouts"][v] = layouts = bench_head_layouts(v, 128, args.head_rows, args.repeats)
            print(f"\nsampling head, vocab {v} x hidden 128, ms per product:")
            for n, r in layouts.items():
                print(f"  {n:>4s} rows  " + "  ".join(f"{name} {ms:7.3f}" for name, ms in r.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
