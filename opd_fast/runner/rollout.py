"""Rollout: batched KV-cache sampling on the HF model, recording the sampler's log-probs.

One forward of the left-padded prompts fills the cache, then one token per step for the whole
batch, on the decode path ``rollout.decode`` picks (``decode.py``: HF's forward, or the fast step of
the Llama/Mistral/Qwen family on a static cache); finished rows keep feeding a masked pad token so
the batch stays rectangular. Each row stops at EOS or at a stop string or after ``max_new_tokens``
(``truncated``). Sampling draws one uniform per row (inverse CDF, ``sample_tokens``). Per token the
loop does no per-row Python work beyond the stop-string check, which decodes a short tail window of
each active row (``StopStrings``) instead of its whole completion; the attention mask and positions
are updated in place rather than rebuilt from the whole mask. The recorded log-prob of a token is its
log-probability under the distribution it was actually drawn from (after temperature / top-k /
top-p; under the raw model for greedy), which is what importance-sampling corrections need. With a
``CorrectedDecode`` (``correction.py``) the routed teachers decode beside the student and may replace
each sampled token; the batch's ``corrected_mask`` marks those tokens. With ``handoff``, rows that finished
leave the decode batch in groups (``RowGroup``: each with its own re-padded batch, for scoring them early); a
row's samples stay its own, as every step still draws one uniform per row of the whole batch.

Public API: ``RolloutBatch`` (plain data handed to scoring and learning), ``RowGroup``, ``rollout`` and
``from_completions`` (off-policy batches: dataset references or any given texts), ``sample_tokens``,
``StopStrings``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .config import RolloutConfig
from .data import Prompt, encode_prompt
from .decode import start_decode
from .models import LoadedModel, head_logits

if TYPE_CHECKING:
    from .correction import CorrectedDecode


@dataclass
class RolloutBatch:
    """Prompts (left-padded) followed by completions (right-padded), ``(B, L)`` each.

    ``completion_mask`` is True at completion tokens (EOS included); position ``j`` of the model's
    output predicts token ``j + 1``, so ``target_mask = completion_mask[:, 1:]`` selects the states
    whose next-token distributions are distilled. ``corrected_mask`` (corrected rollouts only) is True
    at the completion tokens a teacher drew in place of the student's.
    """

    prompts: list[Prompt]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    completions: list[str]
    truncated: list[bool]
    source: str = "student"  # "student" | "teacher" | "dataset"
    corrected_mask: torch.Tensor | None = None
    # The rows' hand-off partition, in hand-off order, when some rows were handed off before the rollout ended
    # (``rollout(handoff=...)``); empty: the batch is one group.
    groups: list[RowGroup] = field(default_factory=list)

    @property
    def target_mask(self) -> torch.Tensor:
        return self.completion_mask[:, 1:]

    @property
    def targets(self) -> torch.Tensor:
        """Completion token ids in the row-major order every stage uses."""
        return self.target_ids()

    def target_ids(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Completion token ids of ``rows`` (all rows by default), flattened row-major: ``(N,)``."""
        ids = self.input_ids if rows is None else self.input_ids[rows]
        return self._at_targets(ids[:, 1:], rows)

    def target_sampler_logprobs(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The recorded sampler log-prob of each of ``target_ids(rows)``: ``(N,)``."""
        lps = self.sampler_logprobs if rows is None else self.sampler_logprobs[rows]
        return self._at_targets(lps[:, 1:], rows)

    def target_states(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """States ``(len(rows), L, H)`` of the batch's ``rows`` (all by default) at the positions predicting
        ``target_ids(rows)``: ``(N, H)``, on ``hidden``'s device."""
        return self._at_targets(hidden[:, :-1], rows)

    def _at_targets(self, aligned: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """The one place stages pick completion tokens: ``aligned`` holds ``rows``, shifted to the targets."""
        mask = self.target_mask if rows is None else self.target_mask[rows.to(self.target_mask.device)]
        return aligned[mask.to(aligned.device)]

    @property
    def prompt_len(self) -> int:
        """Columns of the left-padded prompts (completions start after them)."""
        started = self.completion_mask.any(0).nonzero()
        return int(started[0]) if started.numel() else self.input_ids.shape[1] - 1

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def num_corrected(self) -> int:
        return 0 if self.corrected_mask is None else int(self.corrected_mask.sum())

    def completion_lengths(self) -> list[int]:
        return self.completion_mask.sum(1).tolist()

    @property
    def early_rows(self) -> int:
        """Rows handed off before the rollout ended (all groups but the last)."""
        return sum(len(g.rows) for g in self.groups[:-1])


@dataclass
class RowGroup:
    """Rows of a micro-batch that finished together, with their own batch: those rows alone, re-padded, so
    that scoring them needs nothing from the rows still decoding."""

    rows: list[int]
    batch: RolloutBatch


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return ``(tokens, log-probs under the sampling distribution)``.

    Sampling is by inverse CDF, with one float64 uniform per row: ``torch.multinomial`` draws a random
    number per vocabulary entry (its exponential-race method), which at a 32k vocabulary costs more than
    the model's whole decode step on CPU. It is exact: the row's unnormalized probabilities
    ``w = exp(z - max z)`` (float32) are summed in float64, ``u`` is uniform on ``[0, sum w)`` and the
    token is the first ``i`` whose cumulative sum exceeds ``u``, so ``i`` is drawn with probability
    ``w_i / sum w`` up to the float64 rounding of the cumulative sum (below ``V * 2**-53`` absolute). A
    token of probability 0 (masked by top-k / top-p) spans an empty interval, since adding 0 leaves the
    sum unchanged, and is never drawn. The recorded log-prob ``z_i - max z - log(sum w)`` is that same
    distribution's, without a ``log_softmax`` pass over the vocabulary. ``uniform`` ``(B, 1)`` float64 on
    ``[0, 1)`` gives the rows' draws instead of ``generator`` (a shrunk decode batch keeps its rows' draws).
    """
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    z = logits if temperature == 1 else logits / temperature  # dividing by 1 is exact: skip a pass over B x V
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=True, dim=-1)
        probs = torch.softmax(sorted_z, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
    top = z.max(-1, keepdim=True).values
    cdf = torch.cumsum((z - top).exp_(), -1, dtype=torch.float64)
    total = cdf[:, -1:]
    bad = ~torch.isfinite(total.squeeze(-1))
    if bool(bad.any()):  # multinomial would raise too; searchsorted would silently pick a token
        raise ValueError(f"sample_tokens: the sampling distribution of rows {bad.nonzero().squeeze(-1).tolist()} "
                         "is not finite (NaN or +inf logits)")
    if uniform is None:
        uniform = torch.rand(total.shape, dtype=torch.float64, generator=generator, device=total.device)
    u = uniform * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u * total may round up to total
    tokens = torch.searchsorted(cdf, u, right=True)
    logp = z.gather(-1, tokens).double() - top.double() - total.log()
    return tokens.squeeze(-1), logp.squeeze(-1).to(logits.dtype)


def _eos_ids(lm: LoadedModel) -> list[int]:
    ids = {lm.tokenizer.eos_token_id}
    gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


class StopStrings:
    """Tells, token by token, which rows' decoded completions now contain a stop string.

    Re-decoding a whole completion every token costs O(length) per token; here only a tail window is
    decoded. A stop string that appears at this token overlaps the token's own text, so it suffices to
    search from ``longest - 1`` characters before that text. The window holds the last ``k`` tokens, with
    ``k`` doubled (up to the whole completion, which is the exact check) until the window's text before the
    new token has ``longest + MARGIN`` characters: a window's first characters may decode differently from
    the same tokens in context (a split multi-byte character, a dropped leading space), so they are never
    searched. Tokens that decode to nothing (special tokens) just grow the window.
    """

    MARGIN = 4

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], rows: int) -> None:
        self.stop, self.longest = stop, max(len(s) for s in stop)
        self.decode = _batch_decoder(tokenizer)
        self.ids: list[list[int]] = [[] for _ in range(rows)]

    def add(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Record this step's tokens; return a CPU bool mask of the active rows that now hit a stop string."""
        hit = [False] * len(self.ids)
        rows = active.cpu().nonzero().squeeze(1).tolist()
        for row, token in zip(rows, tokens.cpu()[rows].tolist(), strict=True):
            self.ids[row].append(token)
        n = len(self.ids[rows[0]]) if rows else 0  # every active row has sampled every step so far
        k = min(n, self.longest + self.MARGIN)
        while rows:
            window = [self.ids[row][n - k:] for row in rows]
            whole = k == n  # the whole completion: the exact check, nothing to skip
            texts = self.decode(window if whole else window + [w[:-1] for w in window])
            retry = []
            for j, row in enumerate(rows):
                start = 0 if whole else len(texts[len(rows) + j]) - self.longest + 1
                if not whole and start < self.MARGIN + 1:  # too little text before the new token: widen
                    retry.append(row)
                    continue
                hit[row] = any(s in texts[j][start:] for s in self.stop)
            rows, k = retry, min(n, 2 * k)
        return torch.tensor(hit)


def _batch_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[list[int]]], list[str]]:
    """``tokenizer.batch_decode(..., skip_special_tokens=True)``; for a fast tokenizer without clean-up,
    the Rust decode that it ends in, called directly: the Python wrapper walks every token id, and the
    Rust batch call spreads a few short sequences over a thread pool; both cost more than the decode."""
    if type(tokenizer)._decode is PreTrainedTokenizerFast._decode and not tokenizer.clean_up_tokenization_spaces:
        backend = tokenizer.backend_tokenizer
        return lambda seqs: [backend.decode(ids, skip_special_tokens=True) for ids in seqs]
    return lambda seqs: tokenizer.batch_decode(seqs, skip_special_tokens=True)


def assemble(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    logprobs: list[list[float]] | None,
    truncated: list[bool],
    stop: list[str],
    source: str,
) -> RolloutBatch:
    """Pack token lists into a left-padded-prompt / right-padded-completion ``RolloutBatch``."""
    pad = tokenizer.pad_token_id
    p_len = max(len(p) for p in prompt_ids)
    c_len = max(1, max(len(c) for c in completion_ids))
    b = len(prompts)
    input_ids = torch.full((b, p_len + c_len), pad, dtype=torch.long)
    attention = torch.zeros((b, p_len + c_len), dtype=torch.long)
    completion = torch.zeros((b, p_len + c_len), dtype=torch.bool)
    lps = torch.zeros((b, p_len + c_len), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        input_ids[i, p_len - len(p): p_len] = torch.tensor(p, dtype=torch.long)
        attention[i, p_len - len(p): p_len + len(c)] = 1
        if c:
            input_ids[i, p_len: p_len + len(c)] = torch.tensor(c, dtype=torch.long)
            completion[i, p_len: p_len + len(c)] = True
            if logprobs is not None:
                lps[i, p_len: p_len + len(c)] = torch.tensor(logprobs[i], dtype=torch.float32)
    texts = [_cut_at_stop(tokenizer.decode(c, skip_special_tokens=True), stop) for c in completion_ids]
    return RolloutBatch(prompts, input_ids, attention, completion, lps, texts, truncated, source)


@torch.no_grad()
def rollout(
    lm: LoadedModel,
    prompts: list[Prompt],
    cfg: RolloutConfig,
    generator: torch.Generator | None = None,
    *,
    chat_template: bool = False,
    source: str = "student",
    correction: CorrectedDecode | None = None,
    handoff: float = 0.0,
    on_group: Callable[[RowGroup], None] | None = None,
    on_prompts: Callable[[list[Prompt], torch.Tensor, torch.Tensor], None] | None = None,
) -> RolloutBatch:
    """Sample one completion per prompt with ``lm`` (student, or a teacher for off-policy batches); with
    ``correction``, the routed teachers vet and may replace every sampled token.

    ``handoff`` > 0: once at least that share of the batch's rows has finished while others still decode,
    those rows leave the decode batch (its remaining steps get cheaper) as a ``RowGroup`` passed to
    ``on_group``, e.g. to be scored while the rest decodes; the batch's ``groups`` then record the partition
    (the last group: the rows that ran to the end). Samples do not depend on it: each step still draws one
    uniform per row of the whole batch. ``on_prompts(prompts, ids, mask)`` gets the left-padded prompts
    ``(B, P)`` (the batch's first ``P`` columns) before decoding starts, e.g. for the teachers' prefill."""
    if handoff > 0 and correction is not None:
        raise ValueError("rollout: handoff cannot be combined with a teacher correction, whose decoders keep "
                         "every row of the batch")
    tok = lm.tokenizer
    prompt_ids = [encode_prompt(tok, p.prompt, chat_template) for p in prompts]
    device = lm.device
    pad = tok.pad_token_id
    b, p_len = len(prompts), max(len(p) for p in prompt_ids)
    # The mask grows one column per step inside one preallocated tensor; each new token's position is
    # its row's count of real tokens so far (what position_ids() of the whole mask would give).
    step_ids = torch.full((b, p_len), pad, dtype=torch.long, device=device)
    mask = torch.zeros((b, p_len + cfg.max_new_tokens), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        step_ids[i, p_len - len(p):] = torch.tensor(p, device=device)
        mask[i, p_len - len(p):p_len] = 1
    count = mask.sum(1)
    if on_prompts is not None:
        on_prompts(prompts, step_ids.clone(), mask[:, :p_len].clone())
    eos = torch.tensor(_eos_ids(lm), device=device)
    was_training = lm.model.training
    lm.model.eval()
    head = lm.head
    decode, hidden = start_decode(lm, step_ids, mask[:, :p_len], cfg.max_new_tokens, cfg.decode)
    positions = None  # the prefill computes its own from the prompt mask
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stops = StopStrings(tok, cfg.stop, b) if cfg.stop else None
    live = torch.arange(b, device=device)  # the whole batch's row of each decoding row
    ended = torch.zeros(b, dtype=torch.bool)  # rows that finished (EOS / stop string), whole batch, on the CPU
    group_size = math.ceil(handoff * b)
    groups: list[RowGroup] = []
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def pack(rows: list[int], n_steps: int) -> RolloutBatch:
        """``rows``' batch from the first ``n_steps`` steps (all of those rows' tokens)."""
        tokens, lps, active = (torch.stack(x[:n_steps], 1).cpu()[rows] for x in list(zip(*steps, strict=True))[:3])
        out_tokens = [tokens[i][active[i]].tolist() for i in range(len(rows))]
        out_lps = [lps[i][active[i]].tolist() for i in range(len(rows))]
        return assemble(tok, [prompts[r] for r in rows], [prompt_ids[r] for r in rows], out_tokens, out_lps,
                        [not bool(ended[r]) for r in rows], cfg.stop, source)

    for step in range(cfg.max_new_tokens):
        shrunk = live.shape[0] < b
        if step:
            hidden = decode.step(step_ids[:, -1], mask[:, :p_len + step], positions)  # last step's tokens
        uniform = None
        if shrunk and cfg.temperature > 0:  # the whole batch's draws, so that a row's samples stay its own
            uniform = torch.rand((b, 1), dtype=torch.float64, generator=generator, device=device)[live]
        logits = head_logits(hidden, head)
        tokens, lps = sample_tokens(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator, uniform)
        active = ~done
        replaced = torch.zeros_like(active)
        if correction is not None:
            tokens, lps, replaced = correction(step_ids, mask[:, :p_len + step], positions, tokens, lps, active)
        tokens = torch.where(active, tokens, torch.full_like(tokens, pad))
        if shrunk:  # steps are recorded for the whole batch: rows handed off feed masked pads there
            steps.append((_widen(tokens, live, b, pad), _widen(lps, live, b, 0.0), _widen(active, live, b, False),
                          _widen(replaced, live, b, False)))
        else:
            steps.append((tokens, lps, active, replaced))
        done = done | torch.isin(tokens, eos)
        if stops is not None:
            batch_tokens, _, batch_active, _ = steps[-1]  # the whole batch's, as the stop windows are per row
            done = done | stops.add(batch_tokens, batch_active).to(device)[live]
        mask[:, p_len + step] = active.long()
        count = count + active.long()
        positions = (count - 1).clamp(min=0)[:, None]
        step_ids = tokens[:, None]
        if bool(done.all()):
            break
        if handoff > 0 and step + 1 < cfg.max_new_tokens and int(done.sum()) >= group_size:  # others decode on
            rows = live[done].tolist()
            ended[rows] = True
            groups.append(RowGroup(rows, pack(rows, step + 1)))
            if on_group is not None:
                on_group(groups[-1])
            keep = (~done).nonzero().squeeze(1)
            decode.select(keep)
            live, mask, count, done = live[keep], mask[keep], count[keep], done[keep]
            positions, step_ids = positions[keep], step_ids[keep]
    lm.model.train(was_training)
    ended[live.cpu()] = done.cpu()
    batch = pack(list(range(b)), len(steps))
    if correction is not None:  # completion tokens in row-major order, as assemble() lays them out
        all_active, all_replaced = (torch.stack(x, 1).cpu() for x in list(zip(*steps, strict=True))[2:])
        batch.corrected_mask = torch.zeros_like(batch.completion_mask)
        batch.corrected_mask[batch.completion_mask] = all_replaced[all_active]
    if groups:
        rest = live.tolist()
        groups.append(RowGroup(rest, pack(rest, len(steps))))
        batch.groups = groups
    return batch


def _widen(x: torch.Tensor, live: torch.Tensor, b: int, fill: float | bool) -> torch.Tensor:
    """A decoding rows' tensor ``(len(live),)`` as the whole batch's ``(b,)``: ``fill`` at the other rows."""
    out = x.new_full((b,), fill)
    out[live] = x
    return out


def from_completions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    texts: list[str],
    cfg: RolloutConfig,
    *,
    chat_template: bool = False,
    source: str = "dataset",
) -> RolloutBatch:
    """A batch whose completions are given texts (+ EOS), cut to ``max_new_tokens``; no sampler log-probs."""
    prompt_ids = [encode_prompt(tokenizer, p.prompt, chat_template) for p in prompts]
    completions, truncated = [], []
    for text in texts:
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        truncated.append(len(ids) > cfg.max_new_tokens)
        completions.append(ids[: cfg.max_new_tokens])
    return assemble(tokenizer, prompts, prompt_ids, completions, None, truncated, cfg.stop, source)
