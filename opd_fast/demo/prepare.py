"""Preparing the demo's models, cached so each is trained once per recipe.

- The **teacher** learns ``column_add`` from demonstrations that contain retries (a wrong digit taken
  back with ``<``), so it is near perfect *and* competent on prefixes with a slip in them: exactly the
  states a student's own samples reach and a dataset of clean answers never shows.
- The **student's shared start** (one per seed) is a model several times smaller, trained by SFT on
  ground truth with a few retry demonstrations (so the retry token is in its support: reverse KL cannot
  raise a token the student never samples) until its greedy accuracy on a dev set from the *train*
  split reaches a threshold. Learning this task is an abrupt, seed-dependent phase change, so a
  threshold, not a step count, makes the starts comparable across seeds.

Each model is saved with its tokenizer (``from_pretrained`` loads both) under
``CACHE/<kind>-<recipe hash>/`` with a ``recipe.json`` describing how it was made.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..models.tiny import char_tokenizer, save_model, tiny_causal_lm
from ..runner.config import RolloutConfig
from ..runner.data import Prompt
from ..runner.models import LoadedModel, load_model
from ..runner.rollout import rollout
from ..tasks import Example
from ..tasks.column_add import ALPHABET, ColumnAdd
from .profiles import ModelSize, Profile
from .sft import train_sft

RECIPE = "recipe.json"
ATTEMPTS = 3  # fresh initializations tried per model before settling for the best effort


def accuracy(lm: LoadedModel, task: ColumnAdd, examples: list[Example], temperature: float, seed: int,
             max_new_tokens: int, batch: int = 64) -> float:
    """Verifier accuracy of ``lm``'s completions (greedy when ``temperature`` is 0), through the runner's rollout."""
    cfg = RolloutConfig(max_new_tokens=max_new_tokens, temperature=temperature, micro_batch_size=batch)
    gen = torch.Generator(lm.device).manual_seed(seed)
    prompts = [Prompt(i, ex.prompt, ex.domain, ex.reference) for i, ex in enumerate(examples)]
    scores = []
    for i in range(0, len(prompts), batch):
        out = rollout(lm, prompts[i : i + batch], cfg, gen)
        pairs = zip(out.prompts, out.completions, strict=True)
        scores += [task.verify(p.prompt, c, p.reference or "") for p, c in pairs]
    return sum(scores) / max(1, len(scores))


def _stream(task: ColumnAdd, batch: int, seed: int):
    """Fresh training examples for every step (an unlimited train split), deterministic in ``seed``."""
    return lambda step: task.examples("train", batch, seed=seed * 1_000_003 + step)


def _build(path: Path, size: ModelSize, seed: int) -> LoadedModel:
    """A fresh tiny Llama with the task's character tokenizer, saved to ``path`` and loaded trainable."""
    tok = char_tokenizer(ALPHABET)
    model = tiny_causal_lm(tok, hidden_size=size.hidden_size, num_layers=size.num_layers, num_heads=size.num_heads,
                           max_positions=64, seed=seed)
    save_model(model, tok, path)
    return load_model(str(path), name=path.name, trainable=True)


def _train_to_target(kind: str, path: Path, profile: Profile, size: ModelSize, seed: int, *, retry_rate: float,
                     lr: float, batch: int, max_steps: int, target: float, need_sampled: bool) -> dict:
    """SFT a fresh model until its dev accuracy reaches ``target`` (greedy, and T=1 when ``need_sampled``).

    Whether a tiny model learns the task within ``max_steps`` depends on its initialization (an abrupt,
    seed-dependent phase change), so a model that misses the target is discarded and a new one drawn,
    up to ``ATTEMPTS`` times; the recipe records every attempt. This depends on nothing but the task.
    """
    task = ColumnAdd(profile.digits)
    dev = task.examples("train", profile.dev_prompts, seed=10_000 + seed)  # never the eval split
    tmp = path.with_name(path.name + ".tmp")
    attempts = []

    def met(reached: dict[str, float]) -> bool:
        return reached.get("greedy", 0.0) >= target and (not need_sampled or reached.get("sampled", 0.0) >= target)

    for attempt in range(ATTEMPTS):
        init = seed + 1000 * attempt
        lm = _build(tmp, size, init)
        reached: dict[str, float] = {}

        def done(step: int, lm: LoadedModel = lm, reached: dict[str, float] = reached) -> bool:
            reached["greedy"] = accuracy(lm, task, dev, 0.0, seed, profile.max_new_tokens)
            if need_sampled and reached["greedy"] >= target:
                reached["sampled"] = accuracy(lm, task, dev, 1.0, seed, profile.max_new_tokens)
            lm.model.train()
            return met(reached)

        steps, _ = train_sft(lm, _stream(task, batch, init), steps=max_steps, lr=lr, retry_rate=retry_rate, seed=init,
                             warmup=min(100, max_steps // 10), check_every=profile.check_every, done=done,
                             desc=f"{kind} (attempt {attempt + 1})")
        if not reached:
            done(steps)
        ok = met(reached)
        attempts.append({"init_seed": init, "steps": steps, "dev_accuracy": dict(reached)})
        if ok:
            break
    recipe = {"kind": kind, "seed": attempts[-1]["init_seed"], "steps": steps, "dev_accuracy": reached,
              "target": target, "reached_target": ok, "attempts": attempts, "size": asdict(size),
              "retry_rate": retry_rate, "profile": asdict(profile)}
    save_model(lm.model, lm.tokenizer, tmp)
    (tmp / RECIPE).write_text(json.dumps(recipe, indent=2))
    tmp.replace(path)  # atomic: a half-trained model is never picked up from the cache
    return recipe


def _cached(path: Path) -> dict | None:
    recipe = path / RECIPE
    return json.loads(recipe.read_text()) if recipe.is_file() else None


def _link(path: Path, name: str) -> None:
    """A stable name (``CACHE/teacher``, ``CACHE/student-seed0``) for the last prepared model, so configs
    such as ``examples/demo/on_policy.toml`` can point at it without knowing the recipe hash."""
    link = path.parent / name
    tmp = path.parent / f".{name}.link"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(path.name)
    tmp.replace(link)


def prepare_teacher(profile: Profile, cache: Path) -> tuple[Path, dict]:
    """The teacher's directory (trained now unless cached) and its recipe."""
    path = Path(cache) / f"teacher-{profile.teacher_key()}"
    recipe = _cached(path)
    if recipe is None:
        recipe = _train_to_target(
            "teacher", path, profile, profile.teacher, 0, retry_rate=profile.teacher_retry_rate, lr=profile.teacher_lr,
            batch=profile.teacher_batch, max_steps=profile.teacher_max_steps, target=profile.teacher_target,
            need_sampled=True,
        )
    _link(path, "teacher")
    return path, recipe


def prepare_student(profile: Profile, cache: Path, seed: int) -> tuple[Path, dict]:
    """One seed's shared initial student (trained now unless cached) and its recipe."""
    path = Path(cache) / f"student-{profile.student_key(seed)}"
    recipe = _cached(path)
    if recipe is None:
        recipe = _train_to_target(
            "student", path, profile, profile.student, seed + 1, retry_rate=profile.student_retry_rate,
            lr=profile.student_lr, batch=profile.student_batch, max_steps=profile.student_max_steps,
            target=profile.student_target, need_sampled=False,
        )
    _link(path, f"student-seed{seed}")
    return path, recipe


def parameter_count(path: Path) -> int:
    """Parameters of a prepared model (for the report)."""
    lm = load_model(str(path))
    return sum(p.numel() for p in lm.model.parameters())


