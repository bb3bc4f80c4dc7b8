"""End-to-end on-policy distillation throughput: ``opd-fast train`` against TRL on the very same setup.

Both sides get the same saved random Llama models (built from configs once into a cache
directory), the same tokenizer with the same chat template, the same arithmetic prompts, batch,
new-token budget, divergence (forward KL), learning rate (constant), dtype and thread count. TRL
runs at its fastest fair setting: fully on-policy (``lmbda=1``), KV-cache generation, gradient
checkpointing off (its default turns it on, which also disables the cache in generation).

Each arm runs in its own subprocess (``e2e_worker``), so its peak RSS is its own; arms are run in
rotated order for every round so load drift is shared. Generated tokens are counted up to and
including EOS; the first ``warmup_steps`` steps of every process are excluded; steps report
medians with min-max. opd-fast arms are config overrides (``run.pipeline="strict"``, ...), so a new
runner mode is one more ``Arm``.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

ArmKind = Literal["opd-fast", "trl-gkd", "trl-distill"]
MODEL_SPEC_FILE = "model_spec.json"
PROMPTS_FILE = "prompts.jsonl"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Arm:
    """One contender: a TRL trainer, or ``opd-fast train`` with config ``overrides`` (``key=value`` TOML)."""

    name: str
    kind: ArmKind
    overrides: tuple[str, ...] = ()

    @staticmethod
    def parse(text: str) -> Arm:
        """``trl-gkd``, ``trl-distill`` or ``NAME=KEY=VALUE;KEY=VALUE`` (an opd-fast arm)."""
        if text in ("trl-gkd", "trl-distill"):
            return Arm(text, text)
        name, sep, rest = text.partition("=")
        if not sep or not name.startswith("opd-fast"):
            raise ValueError(f"an arm is trl-gkd, trl-distill or opd-fast[-NAME]=KEY=VALUE;KEY=VALUE, got {text!r}")
        overrides = tuple(o.strip() for o in rest.split(";") if o.strip())
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"arm {name!r}: overrides must be KEY=VALUE, got {bad}")
        return Arm(name, "opd-fast", overrides)

    @property
    def spec(self) -> str:
        return self.name if self.kind != "opd-fast" else f"{self.name}=" + ";".join(self.overrides)


DEFAULT_ARMS: tuple[Arm, ...] = (
    Arm("trl-gkd", "trl-gkd"),
    Arm("trl-distill", "trl-distill"),
    Arm("opd-fast-serial", "opd-fast", ('run.pipeline="serial"',)),
    # Strict and async overlap stages only across micro-batches, so they split the batch; serial at the same
    # split separates the cost of smaller decode batches from the gain of overlapping.
    Arm("opd-fast-serial-mb4", "opd-fast", ('run.pipeline="serial"', "rollout.micro_batch_size=4")),
    Arm("opd-fast-strict", "opd-fast", ('run.pipeline="strict"', "rollout.micro_batch_size=4")),
    Arm("opd-fast-async1", "opd-fast", ('run.pipeline="strict"', "rollout.micro_batch_size=4", "run.max_staleness=1")),
)
QUICK_ARMS: tuple[Arm, ...] = (DEFAULT_ARMS[0], DEFAULT_ARMS[2])


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the saved random models (teacher wider and deeper than the student)."""

    vocab_size: int
    teacher_hidden: int = 256
    teacher_layers: int = 4
    student_hidden: int = 128
    student_layers: int = 2
    heads: int = 4


@dataclass(frozen=True)
class E2EConfig:
    """Everything a run depends on (recorded in the JSON)."""

    vocab_sizes: tuple[int, ...] = (512, 32000)
    arms: tuple[Arm, ...] = DEFAULT_ARMS
    steps: int = 12
    warmup_steps: int = 2
    rounds: int = 1
    batch_size: int = 8
    max_new_tokens: int = 32
    lr: float = 1e-4
    threads: int = 2
    seed: int = 0
    num_prompts: int = 512
    cache_dir: str = "runs/bench-e2e-models"
    models: dict[int, ModelSpec] = field(default_factory=dict)  # per vocab; default ModelSpec(vocab)
    timeout_s: float = 1800.0

    def model_spec(self, vocab: int) -> ModelSpec:
        return self.models.get(vocab) or ModelSpec(vocab)


def quick_config(cache_dir: str) -> E2EConfig:
    """A toy run that finishes in seconds: tiny models, a few steps, opd-fast serial against TRL GKD."""
    toy = ModelSpec(512, teacher_hidden=32, teacher_layers=1, student_hidden=16, student_layers=1, heads=2)
    return E2EConfig(vocab_sizes=(512,), arms=QUICK_ARMS, steps=3, warmup_steps=1, batch_size=2, max_new_tokens=4,
                     threads=1, num_prompts=16, cache_dir=cache_dir, models={512: toy}, timeout_s=300.0)


# ---------------------------------------------------------------- shared inputs


def arithmetic_prompts(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` two-number sums as a user question and the correct answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        out.append({"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b)})
    return out


def prepare(cfg: E2EConfig, vocab: int) -> Path:
    """Save the models, tokenizer and prompts for ``vocab`` under the cache directory (once per spec)."""
    spec = cfg.model_spec(vocab)
    # Absolute: the opd-fast arms' configs live in their run directories and resolve relative paths there.
    root = Path(cfg.cache_dir).resolve() / (f"v{vocab}_t{spec.teacher_hidden}x{spec.teacher_layers}"
                                  f"_s{spec.student_hidden}x{spec.student_layers}")
    marker = root / MODEL_SPEC_FILE
    want = {**asdict(spec), "num_prompts": cfg.num_prompts, "seed": cfg.seed}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return root
    from ..models.tiny import char_tokenizer, save_model, tiny_causal_lm

    tok = char_tokenizer(vocab_size=vocab)
    tok.chat_template = CHAT_TEMPLATE
    for name, hidden, layers, seed in (("teacher", spec.teacher_hidden, spec.teacher_layers, 1),
                                       ("student", spec.student_hidden, spec.student_layers, 0)):
        model = tiny_causal_lm(tok, arch="llama", hidden_size=hidden, num_layers=layers, num_heads=spec.heads,
                               seed=seed)
        save_model(model, tok, root / name)
    rows = arithmetic_prompts(cfg.num_prompts, cfg.seed)
    (root / PROMPTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    marker.write_text(json.dumps(want))
    return root


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @staticmethod
    def of(values: list[float]) -> Spread | None:
        return Spread(statistics.median(values), min(values), max(values)) if values else None


@dataclass
class ArmResult:
    """One arm at one vocabulary: measured steps over every round, peak RSS of its worst process."""

    arm: str
    vocab: int
    status: str = "ok"
    reason: str = ""
    steps: list[dict] = field(default_factory=list)  # {"wall_s", "tokens", "stages": {stage: s}}
    peak_rss_mb: float | None = None

    @property
    def tokens_per_s(self) -> Spread | None:
        return Spread.of([s["tokens"] / s["wall_s"] for s in self.steps if s["wall_s"] > 0])

    @property
    def step_s(self) -> Spread | None:
        return Spread.of([s["wall_s"] for s in self.steps])

    def stage_medians(self) -> dict[str, float]:
        names = dict.fromkeys(k for s in self.steps for k in s.get("stages", {}))
        return {k: statistics.median(s["stages"].get(k, 0.0) for s in self.steps) for k in names}


def run_arm(arm: Arm, vocab: int, root: Path, cfg: E2EConfig, out_dir: Path) -> dict:
    """One arm in a fresh interpreter (``e2e_worker``); a crash or timeout comes back as a status."""
    payload = json.dumps({"arm": asdict(arm), "vocab": vocab, "root": str(root), "out_dir": str(out_dir),
                          "config": {k: v for k, v in asdict(cfg).items() if k not in ("arms", "models")}})
    try:
        proc = subprocess.run([sys.executable, "-m", "opd_fast.benchmarking.e2e_worker", payload],
                              capture_output=True, text=True, timeout=cfg.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "too-slow", "reason": f"did not finish within {cfg.timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "reason": f"worker exited {proc.returncode}: {tail[:400]}"}
    return json.loads(lines[-1])


def run_e2e(cfg: E2EConfig, out_dir: str | Path, log: Callable[[str], None] = print) -> list[ArmResult]:
    """Every arm at every vocabulary, ``rounds`` times in rotated order; results per (arm, vocab)."""
    out_dir = Path(out_dir).resolve()  # the arms run with their run directory as the config base
    results: list[ArmResult] = []
    for vocab in cfg.vocab_sizes:
        root = prepare(cfg, vocab)
        by_arm = {arm.name: ArmResult(arm.name, vocab) for arm in cfg.arms}
        arms = list(cfg.arms)
        for r in range(cfg.rounds):
            for arm in arms[r % len(arms):] + arms[: r % len(arms)]:
                res = by_arm[arm.name]
                if res.status != "ok":
                    continue
                out = run_arm(arm, vocab, root, cfg, out_dir / f"v{vocab}" / f"{arm.name}_r{r}")
                if out["status"] != "ok":
                    res.status, res.reason = out["status"], out["reason"]
                else:
                    res.steps += out["steps"][cfg.warmup_steps:]
                    res.peak_rss_mb = max(res.peak_rss_mb or 0.0, out["peak_rss_mb"])
                tps = res.tokens_per_s
                log(f"V={vocab} {arm.name:<18} round {r}: {res.status} "
                    + (f"{tps.median:.0f} gen tok/s" if tps and res.status == "ok" else res.reason))
        results += by_arm.values()
    return results


# ---------------------------------------------------------------- report

HEADERS = ("vocab", "threads", "arm", "gen tok/s (median, min-max)", "x trl-gkd", "step s", "stages s (median)",
           "peak RSS MB", "status")


def _baseline(results: list[ArmResult], vocab: int) -> float | None:
    base = next((r for r in results if r.vocab == vocab and r.arm == "trl-gkd" and r.status == "ok"), None)
    return base.tokens_per_s.median if base is not None and base.tokens_per_s else None


def rows(results: list[ArmResult], cfg: E2EConfig) -> list[tuple[str, ...]]:
    out = []
    for r in results:
        tps, step, base = r.tokens_per_s, r.step_s, _baseline(results, r.vocab)
        ok = r.status == "ok" and tps is not None
        stages = " / ".join(f"{k} {v:.3f}" for k, v in r.stage_medians().items()) if ok else "-"
        out.append((
            str(r.vocab), str(cfg.threads), r.arm,
            f"{tps.median:.0f} ({tps.min:.0f}-{tps.max:.0f})" if ok else "-",
            f"{tps.median / base:.2f}" if ok and base else "-",
            f"{step.median:.3f}" if ok else "-", stages,
            f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-",
            r.status if not r.reason else f"{r.status}: {r.reason}",
        ))
    return out


def format_markdown(results: list[ArmResult], cfg: E2EConfig) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows(results, cfg)]
    return "\n".join(lines)


def plot(results: list[ArmResult], path: str | Path, title: str) -> None:
    """Generated tokens/s per arm, one group of bars per vocabulary, whiskers min-max over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting.palette import implementation_colour

    vocabs = list(dict.fromkeys(r.vocab for r in results))
    arms = list(dict.fromkeys(r.arm for r in results))
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(2.5 + 2.2 * len(vocabs), 4.5))
    for r in results:
        tps = r.tokens_per_s
        if r.status != "ok" or tps is None:
            continue
        x = vocabs.index(r.vocab) - 0.4 + width * (arms.index(r.arm) + 0.5)
        ax.bar(x, tps.median, width, color=implementation_colour(r.arm), edgecolor="black", linewidth=0.5,
               label=r.arm if r.vocab == vocabs[0] else None)
        ax.errorbar(x, tps.median, yerr=[[tps.median - tps.min], [tps.max - tps.median]], color="black", capsize=3)
    ax.set_xticks(range(len(vocabs)), [f"vocab {v}" for v in vocabs])
    ax.set_ylabel("generated tokens / s (median, min-max over steps)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_json(results: list[ArmResult], cfg: E2EConfig, meta: dict) -> dict:
    records = []
    for r in results:
        rec = asdict(r)
        for name in ("tokens_per_s", "step_s"):
            spread = getattr(r, name)
            rec[name] = None if spread is None else asdict(spread)
        rec["stage_medians_s"] = r.stage_medians()
        records.append(rec)
    config = {**asdict(cfg), "arms": [a.spec for a in cfg.arms],
              "models": {str(v): asdict(cfg.model_spec(v)) for v in cfg.vocab_sizes}}
    return {**meta, "config": config, "results": records}
