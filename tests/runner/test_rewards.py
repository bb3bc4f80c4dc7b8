"""Rewards: running per-domain moments, reward-model scoring, routing between reward models and verifiers,
and the runner's use of them (config checks, checkpointed moments)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from opd_fast.models.tiny import char_tokenizer, save_model
from opd_fast.runner.checkpoint import load_state
from opd_fast.runner.config import config_from_dict, config_to_dict, validate_config
from opd_fast.runner.data import Prompt
from opd_fast.runner.evaluate import Verifiers
from opd_fast.runner.rewards import RewardModel, Rewards, RunningMoments
from opd_fast.runner.trainer import train


def make_reward_model(path: Path, num_labels: int = 1, seed: int = 0) -> str:
    tok = char_tokenizer("abcdefgh =\n")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels,
                         pad_token_id=tok.pad_token_id)
    save_model(LlamaForSequenceClassification(config), tok, path)
    return str(path)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_reward_model(tmp_path_factory.mktemp("rm") / "reward")


@pytest.mark.parametrize("splits", [[7], [1, 6], [3, 3, 1], [1, 1, 1, 1, 1, 1, 1]])
def test_running_moments_match_the_whole_sample_however_it_arrives(splits: list[int]) -> None:
    values = torch.tensor([0.5, -2.0, 3.25, 1.0, 1.0, 7.5, -0.125], dtype=torch.float64)
    moments = RunningMoments()
    for part in torch.split(values, splits):
        moments.update(part)
    assert moments.count == 7
    assert moments.mean == pytest.approx(float(values.mean()), rel=1e-12)
    assert moments.std == pytest.approx(float(values.std(unbiased=False)), rel=1e-12)


def test_one_score_is_centred_not_divided_by_a_zero_spread() -> None:
    moments = RunningMoments()
    moments.update(torch.tensor([4.0]))
    assert moments.standardize(torch.tensor([4.0, 5.0])).tolist() == [0.0, 1.0]


def test_reward_model_scores_do_not_depend_on_batch_padding(reward_dir: str) -> None:
    rm = RewardModel(reward_dir)
    prompts, completions = ["ab=", "abcdef=", "h="], ["ba", "fedcbahh", ""]
    batched = rm(prompts, completions)
    alone = torch.cat([rm([p], [c]) for p, c in zip(prompts, completions, strict=True)])
    assert batched.shape == (3,)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert len(set(batched.tolist())) == 3  # a real model: different texts, different scores


@pytest.mark.parametrize(("make", "match"), [
    (lambda tmp: str(tmp / "absent"), r"loss\.reward_models.*not a model directory"),
    (lambda tmp: make_reward_model(tmp / "two", num_labels=2), r"num_labels=2.*one output"),
])
def test_reward_model_errors_name_the_config_key_and_the_problem(tmp_path: Path, make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RewardModel(make(tmp_path))


def test_reward_model_domains_are_standardized_and_the_rest_use_their_verifier(reward_dir: str) -> None:
    rewards = Rewards(Verifiers({}), {"a": reward_dir})
    words = ("ab", "cd", "ef", "gh")
    prompts = [Prompt(index=i, prompt=f"{w}=", domain=d, reference=w) for i, w in enumerate(words) for d in "ab"]
    completions = ["ab", "zz", "cd", "cd", "fe", "ef", "hg", "x"]
    out = rewards(prompts, completions)
    a_rows = [i for i, p in enumerate(prompts) if p.domain == "a"]
    b_rows = [i for i, p in enumerate(prompts) if p.domain == "b"]
    assert out[b_rows].tolist() == [0.0, 1.0, 1.0, 0.0]  # exact match against the reference
    assert float(out[a_rows].mean()) == pytest.approx(0.0, abs=1e-5)  # first batch: its own moments
    assert float(out[a_rows].std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)
    state = rewards.state_dict()
    assert state["a"]["count"] == 4
    restored = Rewards(Verifiers({}), {"a": reward_dir})
    restored.load_state_dict(json.loads(json.dumps(state)))
    torch.testing.assert_close(restored(prompts, completions), rewards(prompts, completions))


@pytest.mark.parametrize(("loss", "match"), [
    ({"reward_models": {"a": "rm"}}, r"loss\.reward_models.*verifier_weight is 0"),
    ({"reward_models": {"a": "rm"}, "verifiers": {"a": "m:f"}, "verifier_weight": 1.0}, r"both score domain"),
])
def test_config_refuses_unused_or_ambiguous_reward_models(make_config, tmp_path: Path, loss: dict,
                                                          match: str) -> None:
    data = config_to_dict(make_config(tmp_path))
    data["loss"].update(loss)
    with pytest.raises(ValueError, match=match):
        validate_config(config_from_dict(data))


def test_reward_moments_resume_exactly(make_config, reward_dir: str, tmp_path: Path) -> None:
    """Two steps at once, or one step then a resumed second: the same moments in the last checkpoint."""

    def run(out: Path, steps: int, resume: bool = False) -> None:
        train(make_config(out, loss={"verifier_weight": 1.0, "reward_models": {"a": reward_dir}},
                          optim={"steps": steps, "lr": 1e-2}, checkpoint={"every": 1, "keep": 2}), resume=resume)

    run(tmp_path / "straight", 2)
    run(tmp_path / "resumed", 1)
    run(tmp_path / "resumed", 2, resume=True)
    straight, resumed = (load_state(tmp_path / name / "checkpoints" / "step-00000002")["rewards"]
                         for name in ("straight", "resumed"))
    assert straight["a"]["count"] > 0 and straight["a"]["m2"] > 0
    assert resumed == straight
