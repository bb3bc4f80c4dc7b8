import pytest
import torch

from opd_fast.runner.config import RolloutConfig
from opd_fast.runner.data import Prompt
from opd_fast.runner.models import forward_hidden, head_logits, load_model
from opd_fast.runner.rollout import from_completions, rollout, sample_tokens

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
