"""The rollout's per-token work: stop strings found on a tail window exactly where a whole-completion
decode finds them first, sampling unchanged by the in-place mask and positions, and the sampling head
in either layout."""

import random

import pytest
import torch

from opd_fast.models.tiny import char_tokenizer
from opd_fast.runner.config import RolloutConfig
from opd_fast.runner.data import Prompt
from opd_fast.runner.models import WEIGHT_MAJOR_MAX_ROWS, Head, forward_hidden, head_logits, load_model
from opd_fast.runner.rollout import StopStrings, rollout, sample_tokens


def first_stop(tokenizer, ids: list[int], stop: list[str]) -> int | None:
    """The exact rule: the first n at which decode(ids[:n]) contains a stop string (None: never)."""
    for n in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:n], skip_special_tokens=True) for s in stop):
            return n
    return None


def stop_steps(tokenizer, rows: list[list[int]], stop: list[str]) -> list[int | None]:
    """Feed ``rows`` token by token through ``StopStrings``; the step at which each row first hits."""
    checker, hits = StopStrings(tokenizer, stop, len(rows)), [None] * len(rows)
    for step in range(len(rows[0])):
        active = torch.tensor([h is None for h in hits])
        tokens = torch.tensor([r[step] for r in rows])
        for row in checker.add(tokens, active).nonzero().squeeze(1).tolist():
            hits[row] = step + 1
    return hits


@pytest.mark.parametrize("stop", [["ab"], ["h\n", "c c"], ["=", "fedcba"], ["abcdefgh abcdefgh"]])
def test_tail_window_finds_the_first_stop_like_a_whole_decode(stop: list[str]) -> None:
    tok = char_tokenizer("abcdefgh =\n")
    rng = random.Random(0)
    specials = [tok.pad_token_id, tok.bos_token_id, tok.unk_token_id]  # decode to "": the window must grow
    chars = [tok.convert_tokens_to_ids(c) for c in "abcdefgh =\n"]
    rows = [[rng.choice(specials) if rng.random() < p else rng.choice(chars) for _ in range(90)]
            for p in (0.0, 0.3, 0.8, 0.95) for _ in range(6)]
    spread = [t for c in stop[0] for t in (tok.convert_tokens_to_ids(c), *[tok.pad_token_id] * rng.randrange(4))]
    rows.append((spread + [chars[0]] * 90)[:90])  # the stop string spread over many special tokens
    got = stop_steps(tok, rows, stop)
    assert got == [first_stop(tok, r, stop) for r in rows]
    assert any(g is not None for g in got) and any(g is None for g in got)  # both outcomes exercised


def test_rollout_stops_at_the_first_stop_string(models: dict) -> None:
    lm = load_model(models["student"])
    stop = ["ab", "e\n", "hh"]
    prompts = [Prompt(i, p, "d", None) for i, p in enumerate(["abc=", "a=", "hhgg fed=", "fa="] * 2)]
    stopped = 0
    for seed in range(4):
        batch = rollout(lm, prompts, RolloutConfig(max_new_tokens=25, stop=stop), torch.Generator().manual_seed(seed))
        eos = lm.tokenizer.eos_token_id
        for r in range(len(prompts)):
            ids = batch.input_ids[r][batch.completion_mask[r]].tolist()
            n = first_stop(lm.tokenizer, ids, stop)
            if n is not None:  # stopped right at the first hit, and the text is cut before the stop string
                stopped += 1
                assert n == len(ids) and not batch.truncated[r]
                assert all(s not in batch.completions[r] for s in stop)
            else:
                assert batch.truncated[r] or ids[-1] == eos
    assert stopped > 0


def test_sampling_matches_a_step_by_step_full_recompute(models: dict) -> None:
    """In-place mask and counted positions give the tokens and log-probs a plain loop gives: each step
    re-runs the whole left-padded sequence without a cache and with positions from the whole mask."""
    lm = load_model(models["student"])
    prompts = [Prompt(0, "abc=", "d", None), Prompt(1, "a=", "d", None), Prompt(2, "hhgg fed=", "d", None)]
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.0)
    batch = rollout(lm, prompts, cfg)
    ids, mask = batch.input_ids, batch.attention_mask
    p_len = int((~batch.completion_mask).cumprod(1).sum(1).min())  # prompts end where completions begin
    with torch.no_grad():
        for j in range(p_len, ids.shape[1]):
            hidden, _ = forward_hidden(lm, ids[:, :j], mask[:, :j])
            tokens, lps = sample_tokens(head_logits(hidden[:, -1], lm.head), 0.0, 0, 1.0, None)
            live = batch.completion_mask[:, j]
            assert torch.equal(tokens[live], ids[live, j])
            torch.testing.assert_close(lps[live], batch.sampler_logprobs[live, j], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 8, WEIGHT_MAJOR_MAX_ROWS, WEIGHT_MAJOR_MAX_ROWS + 1, 64])
@pytest.mark.parametrize("extras", [{}, {"bias": True, "scale": 0.5, "softcap": 3.0}])
def test_head_logits_in_either_layout_are_the_heads_logits(rows: int, extras: dict) -> None:
    """Weight-major for few rows, nn.Linear's layout beyond: the same logits to fp32 rounding, any leading shape."""
    g = torch.Generator().manual_seed(rows)
    weight, hidden = torch.randn(300, 24, generator=g), torch.randn(rows, 24, generator=g)
    bias = torch.randn(300, generator=g) if extras.get("bias") else None
    head = Head(weight, bias, extras.get("scale", 1.0), extras.get("softcap"))
    expected = (hidden.double() @ weight.double().T + (0 if bias is None else bias.double())) * head.scale
    if head.softcap is not None:
        expected = head.softcap * torch.tanh(expected / head.softcap)
    logits = head_logits(hidden, head, temperature=0.5)
    assert logits.dtype == torch.float32 and logits.is_contiguous()
    torch.testing.assert_close(logits.double(), expected / 0.5, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_logits(hidden.view(1, rows, 24), head, 0.5), logits[None], atol=0, rtol=0)
