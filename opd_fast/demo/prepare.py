"""Preparing the demo's models: shipped with the package, cached, or trained here by the demo's own code.

- **Two specialist teachers**, one per domain (``domains.DOMAINS``), each trained by the demo's SFT loop
  on its own task until greedy and T=1 accuracy on a train-split dev set reach a target. The
  ``column_add`` teacher learns from demonstrations with retries (a wrong digit taken back with ``<``);
  the ``pair_sum`` teacher from uniformly drawn valid answers, so it knows the continuation of any
  feasible prefix.
- **The student's shared start** (one per seed and student size) is a model several times smaller, trained
  by SFT on both domains' references (mixed batches) until its greedy dev accuracy reaches a threshold
  on every domain. Learning these tasks is an abrupt, seed-dependent phase change, so a threshold, not a
  step count, makes the starts comparable across seeds.

Training all of them takes far longer than the demo's budget on two CPU cores, so the models of the
default profile ship with the package (``opd_fast/demo/models/``, a few hundred kB of safetensors each,
produced by this module, recipe included): ``prepare_*`` looks in the cache, then in the shipped models,
and trains only when neither has the recipe (``retrain=True`` skips the shipped ones and retrains from
scratch). Each model is saved with its tokenizer under ``<kind>-<recipe hash>/`` with a ``recipe.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..models.tiny import save_model, tiny_causal_lm
from ..runner.config import RolloutConfig
from ..runner.data import Prompt
from ..runner.models import LoadedModel, load_model
from ..runner.rollout import rollout
from ..tasks import Example
from .domains import DOMAINS, DOMAINS_BY_NAME, Domain, tokenizer
from .profiles import ModelSize, Profile
from .sft import train_sft

RECIPE = "recipe.json"
ATTEMPTS = 3  # fresh initializations tried per model before settling for the best effort
SHIPPED = Path(__file__).parent / "models"


def accuracy(lm: LoadedModel, examples: list[Example], temperature: float, seed: int, max_new_tokens: int,
             batch: int = 64) -> dict[str, float]:
    """Per-domain verifier accuracy of ``lm``'s completions (greedy when ``temperature`` is 0), through the
    runner's rollout."""
    cfg = RolloutConfig(max_new_tokens=max_new_tokens, temperature=temperature, micro_batch_size=batch)
    gen = torch.Generator(lm.device).manual_seed(seed)
    prompts = [Prompt(i, ex.prompt, ex.domain, ex.reference) for i, ex in enumerate(examples)]
    scores: dict[str, list[float]] = {}
    for i in range(0, len(prompts), batch):
        out = rollout(lm, prompts[i : i + batch], cfg, gen)
        for p, c in zip(out.prompts, out.completions, strict=True):
            scores.setdefault(p.domain, []).append(DOMAINS_BY_NAME[p.domain].task.verify(p.prompt, c, p.reference))
    return {dom: sum(v) / len(v) for dom, v in scores.items()}


def _stream(domains: tuple[Domain, ...], batch: int, seed: int):
    """Fresh training examples for every step (an unlimited train split), deterministic in ``seed``; with
    several domains every batch holds each domain's equal share."""
    share = batch // len(domains)
    return lambda step: [ex for d in domains for ex in d.examples("train", share, seed=seed * 1_000_003 + step)]


def _build(path: Path, size: ModelSize, seed: int) -> LoadedModel:
    """A fresh tiny Llama with the demo's character tokenizer, saved to ``path`` and loaded trainable."""
    tok = tokenizer()
    model = tiny_causal_lm(tok, hidden_size=size.hidden_size, num_layers=size.num_layers, num_heads=size.num_heads,
                           max_positions=64, seed=seed)
    save_model(model, tok, path)
    return load_model(str(path), name=path.name, trainable=True)


def _train_to_target(kind: str, path: Path, profile: Profile, domains: tuple[Domain, ...], size: ModelSize,
                     seed: int, *, retry_rate: float, lr: float, batch: int, max_steps: int, target: float,
                     need_sampled: bool) -> dict:
    """SFT a fresh model on ``domains`` until its dev accuracy reaches ``target`` on each of them (greedy,
    and T=1 when ``need_sampled``).

    Whether a tiny model learns a task within ``max_steps`` depends on its initialization (an abrupt,
    seed-dependent phase change), so a model that misses the target is discarded and a new one drawn,
    up to ``ATTEMPTS`` times; the recipe records every attempt. This depends on nothing but the tasks.
    """
    dev = [ex for d in domains for ex in d.examples("train", profile.dev_prompts, seed=10_000 + seed)]  # not eval
    tmp = path.with_name(path.name + ".tmp")
    attempts = []
    cpu0 = time.process_time()

    def met(reached: dict[str, dict[str, float]]) -> bool:
        modes = ("greedy", "sampled") if need_sampled else ("greedy",)
        return all(min(reached.get(m, {d.name: 0.0 for d in domains}).values()) >= target for m in modes)

    for attempt in range(ATTEMPTS):
        init = seed + 1000 * attempt
        lm = _build(tmp, size, init)
        reached: dict[str, dict[str, float]] = {}

        def done(step: int, lm: LoadedModel = lm, reached: dict[str, dict[str, float]] = reached) -> bool:
            reached["greedy"] = accuracy(lm, dev, 0.0, seed, profile.max_new_tokens)
            if need_sampled and min(reached["greedy"].values()) >= target:
                reached["sampled"] = accuracy(lm, dev, 1.0, seed, profile.max_new_tokens)
            lm.model.train()
            return met(reached)

        steps, _ = train_sft(lm, _stream(domains, batch, init), steps=max_steps, lr=lr, retry_rate=retry_rate,
                             seed=init, warmup=min(100, max_steps // 10), check_every=profile.check_every, done=done,
                             desc=f"{kind} (attempt {attempt + 1})")
        if not reached:
            done(steps)
        ok = met(reached)
        attempts.append({"init_seed": init, "steps": steps, "dev_accuracy": dict(reached)})
        if ok:
            break
    recipe = {"kind": kind, "domains": [d.name for d in domains], "seed": attempts[-1]["init_seed"], "steps": steps,
              "dev_accuracy": reached, "target": target, "reached_target": ok, "attempts": attempts,
              "size": asdict(size), "retry_rate": retry_rate, "cpu_s": round(time.process_time() - cpu0, 1),
              "profile": asdict(profile)}
    save_model(lm.model, lm.tokenizer, tmp)
    (tmp / RECIPE).write_text(json.dumps(recipe, indent=2))
    shutil.rmtree(path, ignore_errors=True)  # a retrained model replaces the cached one
    tmp.replace(path)  # atomic: a half-trained model is never picked up from the cache
    return recipe


def _prepared(name: str, cache: Path, retrain: bool) -> tuple[Path, dict | None]:
    """Where the model ``name`` lives in the cache, and its recipe when it is there to reuse: cached, or
    shipped (copied into the cache first). ``retrain`` reuses nothing."""
    path = Path(cache) / name
    if retrain:
        return path, None
    shipped = SHIPPED / name
    if not (path / RECIPE).is_file() and (shipped / RECIPE).is_file():
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(shipped, tmp)
        tmp.replace(path)
    return path, json.loads((path / RECIPE).read_text()) if (path / RECIPE).is_file() else None


def _link(path: Path, name: str) -> None:
    """A stable name (``CACHE/teacher-pair_sum``, ``CACHE/student-seed0``) for the last prepared model, so
    configs such as ``examples/demo/on_policy.toml`` can point at it without knowing the recipe hash."""
    link = path.parent / name
    tmp = path.parent / f".{name}.{os.getpid()}.link"  # per process: seeds may be prepared in parallel
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(path.name)
    tmp.replace(link)


def prepare_teacher(profile: Profile, cache: Path, domain: Domain, *, retrain: bool = False) -> tuple[Path, dict]:
    """The specialist teacher of ``domain`` (shipped, cached, or trained now) and its recipe."""
    path, recipe = _prepared(f"teacher-{domain.name}-{profile.teacher_key(domain.name)}", cache, retrain)
    if recipe is None:
        recipe = _train_to_target(
            f"teacher-{domain.name}", path, profile, (domain,), profile.teacher, 0,
            retry_rate=profile.teacher_retry_rate, lr=profile.teacher_lr, batch=profile.teacher_batch,
            max_steps=profile.teacher_max_steps, target=profile.teacher_target, need_sampled=True,
        )
    _link(path, f"teacher-{domain.name}")
    return path, recipe


def prepare_student(profile: Profile, cache: Path, seed: int, *, weak: bool = False,
                    retrain: bool = False) -> tuple[Path, dict]:
    """One seed's shared initial student on every domain (shipped, cached, or trained now) and its recipe;
    ``weak`` is the smaller student of the rescue comparison."""
    kind = "weak-student" if weak else "student"
    size, target = (profile.weak_student, profile.weak_student_target) if weak else (profile.student,
                                                                                     profile.student_target)
    path, recipe = _prepared(f"{kind}-{profile.student_key(seed, weak)}", cache, retrain)
    if recipe is None:
        recipe = _train_to_target(
            kind, path, profile, DOMAINS, size, seed + 1, retry_rate=profile.student_retry_rate,
            lr=profile.student_lr, batch=profile.student_batch, max_steps=profile.student_max_steps,
            target=target, need_sampled=False,
        )
    _link(path, f"{kind}-seed{seed}")
    return path, recipe


def parameter_count(path: Path) -> int:
    """Parameters of a prepared model (for the report)."""
    lm = load_model(str(path))
    return sum(p.numel() for p in lm.model.parameters())
