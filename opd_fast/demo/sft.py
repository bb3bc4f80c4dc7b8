"""Supervised fine-tuning for the demo's preparation: the teacher and the student's shared start.

Preparing the demo's models needs plain cross-entropy on demonstrations whose taken-back wrong
digits are *not* targets; the runner's ``loss.sft_weight`` term trains on every token of a reference
completion, so this module holds a small, separate cross-entropy loop built on the runner's public
pieces (prompt
encoding, hidden states, the head). It tokenizes exactly as the runner does
(``BOS prompt completion EOS``), so what the models learn here is what the runner later feeds them.

Demonstrations may contain retries (``column_add.with_retries``): a wrong digit that is taken back.
The wrong digit itself is never a target, so a model learns to recover without learning to slip.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from tqdm import tqdm

from ..runner.data import encode_prompt
from ..runner.learn import lr_lambda
from ..runner.models import LoadedModel, forward_hidden, head_logits
from ..tasks import Example
from ..tasks.column_add import with_retries
from .domains import DOMAINS_BY_NAME

IGNORE = -100


def sft_batch(
    tokenizer, examples: list[Example], retry_rate: float, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` right-padded; ``labels[:, j]`` is the target of position ``j``
    (the next token) or ``IGNORE`` for prompt tokens, taken-back slips and padding. ``retry_rate`` applies
    to the examples of domains with a retry token only."""
    rows: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex.prompt)
        learn = [False] * len(ids)
        rate = retry_rate if DOMAINS_BY_NAME[ex.domain].retries else 0.0
        for text, trained in with_retries(ex.reference, rate, rng):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            learn += [trained] * len(piece)
        ids.append(tokenizer.eos_token_id)
        learn.append(True)
        rows.append((ids, learn))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, learn) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        targets = torch.tensor(ids[1:])
        labels[i, : len(ids) - 1] = torch.where(torch.tensor(learn[1:]), targets, IGNORE)
    return input_ids, attention, labels


def sft_loss(lm: LoadedModel, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the labelled positions. The demo's vocabulary has 42 entries, so plain logits
    are cheaper here than the fused path, which pays off at large vocabularies."""
    hidden, _ = forward_hidden(lm, input_ids, attention)
    keep = labels != IGNORE
    return torch.nn.functional.cross_entropy(head_logits(hidden[keep], lm.head), labels[keep])


def train_sft(
    lm: LoadedModel,
    stream: Callable[[int], list[Example]],
    *,
    steps: int,
    lr: float,
    retry_rate: float,
    seed: int,
    warmup: int = 0,
    min_lr_ratio: float = 0.1,
    check_every: int = 0,
    done: Callable[[int], bool] | None = None,
    desc: str = "sft",
) -> tuple[int, int]:
    """AdamW on ``stream(step)`` batches with the runner's warm-up + cosine schedule (``lr_lambda``) and
    gradient clipping at 1; every ``check_every`` steps ``done(step)`` may stop it early.

    Returns the number of steps taken and of tokens trained on. ``lm.model`` must be trainable.
    """
    rng = random.Random(seed)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, warmup, steps, min_lr_ratio))
    lm.model.train()
    bar = tqdm(total=steps, desc=desc, dynamic_ncols=True, leave=False)
    step = tokens = 0
    try:
        while step < steps:
            input_ids, attention, labels = sft_batch(lm.tokenizer, stream(step), retry_rate, rng)
            tokens += int((labels != IGNORE).sum())
            loss = sft_loss(lm, input_ids, attention, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if check_every and done is not None and step % check_every == 0 and done(step):
                break
    finally:
        bar.close()
    return step, tokens
