import pytest
import torch

from opd_fast.runner.config import RolloutConfig
from opd_fast.runner.data import Prompt
from opd_fast.runner.models import forward_hidden, head_logits, load_model
from opd_fast.runner.rollout import RolloutBatch, from_completions, rollout, sample_tokens

PROMPTS = [Prompt(0, "abc=", "a", "abc"), Prompt(1, "a=", "a", None), Prompt(2, "hhgg fed=", "b", None)]


def full_forward_logprobs(lm, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden, _ = forward_hidden(lm, batch.input_ids, batch.attention_mask)
        logp = torch.log_softmax(head_logits(hidden, lm.head), -1)[:, :-1]
    return logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)[batch.target_mask]


@pytest.mark.parametrize("name", ["student", "teacher_a"])  # llama, qwen2
def test_recorded_logprobs_match_full_forward_with_left_padding(models: dict, name: str) -> None:
    lm = load_model(models[name])
    batch = rollout(lm, PROMPTS, RolloutConfig(max_new_tokens=10), torch.Generator().manual_seed(0))
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1  # rows really are padded differently
    assert batch.attention_mask[:, 0].tolist().count(0) >= 1  # left padding present
    recorded = batch.sampler_logprobs[:, 1:][batch.target_mask]
    assert recorded.numel() == batch.num_tokens > 0
    torch.testing.assert_close(recorded, full_forward_logprobs(lm, batch), atol=1e-4, rtol=1e-4)


def test_eos_and_stop_strings_end_rows(models: dict) -> None:
    lm = load_model(models["student"])
    greedy = RolloutConfig(max_new_tokens=5, temperature=0.0)
    first = rollout(lm, PROMPTS, greedy).input_ids[:, -5].tolist()  # each row's first greedy token
    lm.model.generation_config.eos_token_id = [first[1]]  # rows stop on their own EOS, others continue
    batch = rollout(lm, PROMPTS, greedy)
    for length, cut, tok in zip(batch.completion_lengths(), batch.truncated, first, strict=True):
        assert (length, cut) == ((1, False) if tok == first[1] else (5, True))
    lm.model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    free = rollout(lm, PROMPTS, RolloutConfig(max_new_tokens=12), g)
    row = next(r for r, text in enumerate(free.completions) if len(text) >= 3)
    stop_char = free.completions[row][2]  # a character the row emits: stopping on it cuts the row there
    g = torch.Generator().manual_seed(1)
    stopped = rollout(lm, PROMPTS, RolloutConfig(max_new_tokens=12, stop=[stop_char]), g)
    assert stopped.completions[row] == free.completions[row][: free.completions[row].index(stop_char)]
    assert not stopped.truncated[row]


def test_top_k_one_is_greedy_and_top_p_keeps_the_top_token() -> None:
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    greedy, lp = sample_tokens(logits, 0.0, 0, 1.0, None)
    assert torch.equal(greedy, logits.argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, greedy[:, None]).squeeze(-1))
    tok, lp = sample_tokens(logits, 1.0, 1, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(tok, greedy) and torch.allclose(lp, torch.zeros(5))
    tok, lp = sample_tokens(logits, 0.7, 0, 1e-6, torch.Generator().manual_seed(0))
    assert torch.equal(tok, greedy) and torch.allclose(lp, torch.zeros(5))


def test_from_completions_appends_eos_and_truncates(models: dict) -> None:
    tok = load_model(models["student"]).tokenizer
    batch = from_completions(tok, PROMPTS[:2], ["abc", "abcdefgh"], RolloutConfig(max_new_tokens=5))
    assert batch.completion_lengths() == [4, 5] and batch.truncated == [False, True]
    assert batch.completions == ["abc", "abcde"]
    assert batch.targets[:4].tolist() == [*tok("abc", add_special_tokens=False)["input_ids"], tok.eos_token_id]


def test_recorded_logprobs_are_those_of_the_filtered_sampling_distribution(models: dict) -> None:
    lm = load_model(models["student"])
    cfg = RolloutConfig(max_new_tokens=6, temperature=0.7, top_k=3)
    batch = rollout(lm, PROMPTS, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, _ = forward_hidden(lm, batch.input_ids, batch.attention_mask)
        z = head_logits(hidden, lm.head, 0.7)[:, :-1][batch.target_mask]
    kth = z.topk(3, dim=-1).values[:, -1:]
    logp = torch.log_softmax(z.masked_fill(z < kth, float("-inf")), -1)
    expected = logp.gather(-1, batch.targets[:, None]).squeeze(-1)
    assert torch.isfinite(expected).all()  # every sampled token was inside the top 3
    torch.testing.assert_close(batch.sampler_logprobs[:, 1:][batch.target_mask], expected, atol=1e-4, rtol=1e-4)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution written out independently (float64): temperature, top-k, nucleus."""
    z = logits.double() / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(top_k, -1).values[:, -1:], float("-inf"))
    p = z.softmax(-1)
    above = (p[:, None, :] * (p[:, None, :] > p[:, :, None])).sum(-1)  # mass of the tokens above each token
    return z.masked_fill(above >= top_p, float("-inf")).softmax(-1)


def chi_square_bound(dof: int) -> float:
    """Upper 1e-6 quantile of chi-square(dof) (Wilson-Hilferty): a fair sampler exceeds it once in 10^6 seeds."""
    return dof * (1 - 2 / (9 * dof) + 4.75 * (2 / (9 * dof)) ** 0.5) ** 3


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0, 1.5, -30.0],
                       [-2.0, 0.0, 3.0, 0.1, 0.2, -0.5, 2.9, -4.0, 1.0]])


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8),
                                                              (1.0, 6, 0.7)])
def test_sampled_frequencies_follow_the_sampling_distribution(temperature: float, top_k: int, top_p: float) -> None:
    n = 200_000  # draws per row: enough to see a bias of a few parts in a thousand
    tokens, lps = sample_tokens(LOGITS.repeat(n, 1), temperature, top_k, top_p, torch.Generator().manual_seed(0))
    probs = sampling_probs(LOGITS, temperature, top_k, top_p)
    for row in range(len(LOGITS)):
        drawn = tokens[row::len(LOGITS)]
        counts = torch.bincount(drawn, minlength=LOGITS.shape[1]).double()
        assert counts[probs[row] == 0].sum() == 0  # masked tokens are never drawn
        expected = n * probs[row]
        big = expected >= 5  # the usual chi-square rule; the rare tokens are pooled into one bin
        observed = torch.cat([counts[big], counts[~big].sum()[None]])
        wanted = torch.cat([expected[big], expected[~big].sum()[None]])
        keep = wanted > 0
        stat = float((((observed - wanted) ** 2)[keep] / wanted[keep]).sum())
        assert stat < chi_square_bound(int(keep.sum()) - 1), (row, stat)
        torch.testing.assert_close(lps[row::len(LOGITS)].double(), probs[row, drawn].log(), atol=1e-5, rtol=1e-5)


def test_sampling_is_determined_by_the_generator_alone() -> None:
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1))
    draw = [sample_tokens(logits, 1.0, 50, 0.95, torch.Generator().manual_seed(s))[0] for s in (7, 7, 8)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


def test_a_single_kept_token_is_always_drawn_wherever_it_sits() -> None:
    """The first and last ids, behind and before runs of masked ones: the inverse CDF's edge cases."""
    logits = torch.full((4, 50), -1.0)
    logits[0, 0] = logits[1, 49] = logits[2, 25] = logits[3, 48] = 5.0
    tokens, lps = sample_tokens(logits.repeat(500, 1), 1.0, 1, 1.0, torch.Generator().manual_seed(0))
    assert tokens.view(500, 4).eq(torch.tensor([0, 49, 25, 48])).all() and torch.equal(lps, torch.zeros_like(lps))


def test_non_finite_logits_are_an_error_naming_the_rows() -> None:
    logits = torch.zeros(3, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\] is not finite"):
        sample_tokens(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))


HANDOFF_PROMPTS = [Prompt(i, f"{w}=", "a", None) for i, w in enumerate(["abc", "bad", "cafe", "dead", "face", "h"])]


def rows_of(batch: RolloutBatch, rows: list[int]) -> tuple[list, list, list[str], list[bool]]:
    """Per row: completion token ids, recorded log-probs, text and truncation, independent of padding."""
    mask = batch.completion_mask
    return ([batch.input_ids[r][mask[r]].tolist() for r in rows], [batch.sampler_logprobs[r][mask[r]] for r in rows],
            [batch.completions[r] for r in rows], [batch.truncated[r] for r in rows])


@pytest.mark.parametrize("decode", ["fast", "hf"])
@pytest.mark.parametrize("stop", [[], ["e"]])
def test_handoff_keeps_every_sample_and_partitions_the_rows(models: dict, decode: str, stop: list[str]) -> None:
    lm = load_model(models["student"])
    cfg = RolloutConfig(max_new_tokens=12, decode=decode, stop=stop)
    plain = rollout(lm, HANDOFF_PROMPTS, cfg, torch.Generator().manual_seed(0))
    seen = []
    handed = rollout(lm, HANDOFF_PROMPTS, cfg, torch.Generator().manual_seed(0), handoff=0.25,
                     on_group=lambda g: seen.append(g.rows))
    everyone = list(range(len(HANDOFF_PROMPTS)))
    (ids, lps, texts, cut), (h_ids, h_lps, h_texts, h_cut) = rows_of(plain, everyone), rows_of(handed, everyone)
    assert (ids, texts, cut) == (h_ids, h_texts, h_cut)  # the rows left behind keep their own draws
    torch.testing.assert_close(torch.cat(lps), torch.cat(h_lps))  # a smaller decode batch: rounding only
    assert len(handed.groups) >= 2 and handed.early_rows > 0  # this seed finishes rows early
    assert sorted(r for g in handed.groups for r in g.rows) == everyone
    assert seen == [g.rows for g in handed.groups[:-1]]  # early groups handed over during the rollout
    for g in handed.groups:
        assert len(g.rows) >= 2 or g is handed.groups[-1]  # at least a quarter of 6 rows, but the rest
        assert all(not handed.truncated[r] for r in g.rows) or g is handed.groups[-1]
        part_ids, _, part_texts, part_cut = rows_of(g.batch, list(range(len(g.rows))))
        assert (part_ids, part_texts, part_cut) == tuple([x[r] for r in g.rows] for x in (ids, texts, cut))
        assert torch.equal(g.batch.targets, handed.target_ids(torch.tensor(g.rows)))


def test_handoff_refuses_a_correction(models: dict) -> None:
    with pytest.raises(ValueError, match="handoff cannot be combined with a teacher correction"):
        rollout(load_model(models["student"]), PROMPTS, RolloutConfig(), handoff=0.5, correction=object())
