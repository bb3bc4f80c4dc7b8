"""Teacher-corrected rollouts: the no-op and always-replace limits, the recorded log-probs, the token
accounting, the schedule, and the configurations that are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd_fast.models.tiny import char_tokenizer
from opd_fast.runner import correction
from opd_fast.runner.config import CorrectionConfig, RolloutConfig
from opd_fast.runner.correction import Corrector
from opd_fast.runner.data import Prompt
from opd_fast.runner.decode import start_decode
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.models import Teacher, forward_hidden, head_logits, load_model
from opd_fast.runner.rollout import RolloutBatch, rollout
from opd_fast.runner.score import Router
from opd_fast.runner.trainer import Trainer, train

PROMPTS = [Prompt(0, "abc=", "a", None), Prompt(1, "a=", "b", None), Prompt(2, "hhgg fed=", "b", None),
           Prompt(3, "fa=", "a", None)]
SAMPLING = [RolloutConfig(max_new_tokens=8), RolloutConfig(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9),
            RolloutConfig(max_new_tokens=8, temperature=0.0)]


def corrector(models: dict, cfg: CorrectionConfig, sampling: RolloutConfig, teachers: dict[str, str],
              seed: int = 7) -> Corrector:
    """``teachers``: name -> model directory; ``ta`` takes domain a, every other name the rest."""
    student, loaded = load_model(models["student"]), {}
    for name, path in teachers.items():
        model = load_model(path, name=name)
        vocab = min(model.head.weight.shape[0], student.head.weight.shape[0])  # the ids both heads cover
        loaded[name] = Teacher(model, vocab, domains=["a"] if name == "ta" else [])
    return Corrector(cfg, sampling, student.tokenizer, loaded, Router(loaded), torch.Generator().manual_seed(seed))


def sampler_logprobs(lm, batch: RolloutBatch, rows: torch.Tensor, sampling: RolloutConfig) -> torch.Tensor:
    """Log-prob of ``rows``' completion tokens under ``lm``'s sampling distribution, from one full forward."""
    with torch.no_grad():
        hidden, _ = forward_hidden(lm, batch.input_ids[rows], batch.attention_mask[rows])
        z = head_logits(batch.target_states(hidden, rows), lm.head)[:, :len(lm.tokenizer)]
    if sampling.temperature > 0:
        z = z / sampling.temperature
        if sampling.top_k:
            z = z.masked_fill(z < z.topk(sampling.top_k, -1).values[:, -1:], float("-inf"))
        if sampling.top_p < 1:  # nucleus: keep a token while the mass of the tokens above it is below top_p
            p = z.softmax(-1)
            above = (p[:, None, :] * (p[:, None, :] > p[:, :, None])).sum(-1)
            z = z.masked_fill(above >= sampling.top_p, float("-inf"))
    return torch.log_softmax(z, -1).gather(-1, batch.target_ids(rows)[:, None]).squeeze(-1)


@pytest.mark.parametrize("sampling", SAMPLING[:2])
@pytest.mark.parametrize("rule", [CorrectionConfig(topk=15), CorrectionConfig(topk=0, min_prob=0.0)])
def test_a_rule_that_rejects_nothing_is_the_plain_rollout(models: dict, sampling: RolloutConfig,
                                                          rule: CorrectionConfig) -> None:
    student = load_model(models["student"])
    assert student.head.weight.shape[0] == 15  # topk = vocabulary: every token is inside it
    fix = corrector(models, rule, sampling, {"ta": models["teacher_a"], "tb": models["teacher_b"]})
    corrected = rollout(student, PROMPTS, sampling, torch.Generator().manual_seed(0),
                        correction=fix.begin(PROMPTS, step=1))
    plain = rollout(student, PROMPTS, sampling, torch.Generator().manual_seed(0))
    assert torch.equal(corrected.input_ids, plain.input_ids)
    assert torch.equal(corrected.sampler_logprobs, plain.sampler_logprobs)
    assert corrected.num_corrected == 0 and plain.corrected_mask is None


@pytest.mark.parametrize("sampling", SAMPLING)
def test_replacing_every_token_is_teacher_sampling(models: dict, sampling: RolloutConfig) -> None:
    student = load_model(models["student"])
    fix = corrector(models, CorrectionConfig(min_prob=1.0), sampling, {"all": models["teacher_a"]}, seed=3)
    corrected = rollout(student, PROMPTS, sampling, torch.Generator().manual_seed(0),
                        correction=fix.begin(PROMPTS, step=1))
    teacher = rollout(fix.teachers["all"].model, PROMPTS, sampling, torch.Generator().manual_seed(3))
    assert torch.equal(corrected.input_ids, teacher.input_ids)
    torch.testing.assert_close(corrected.sampler_logprobs, teacher.sampler_logprobs)
    assert corrected.num_corrected == corrected.num_tokens > 0
    assert torch.equal(corrected.corrected_mask, corrected.completion_mask)


@pytest.mark.parametrize("sampling", SAMPLING[:2])
@pytest.mark.parametrize("rule", [CorrectionConfig(topk=3), CorrectionConfig(topk=4, min_prob=0.1, rate=0.5)])
@pytest.mark.parametrize("padded", [False, True], ids=["same-heads", "padded-teacher-head"])
def test_kept_and_replaced_tokens_record_the_distribution_that_drew_them(
        models: dict, padded_teacher: str, sampling: RolloutConfig, rule: CorrectionConfig, padded: bool) -> None:
    student = load_model(models["student"])
    fix = corrector(models, rule, sampling, {"ta": models["teacher_a"],
                                             "tb": padded_teacher if padded else models["teacher_b"]})
    batch = rollout(student, PROMPTS, sampling, torch.Generator().manual_seed(0), correction=fix.begin(PROMPTS, 1))
    corrected = batch.corrected_mask[:, 1:][batch.target_mask]
    assert 0 < int(corrected.sum()) < batch.num_tokens  # both kinds present: the test can tell them apart
    assert batch.num_corrected == int(corrected.sum())
    recorded = batch.target_sampler_logprobs()
    expected = sampler_logprobs(student, batch, torch.arange(len(PROMPTS)), sampling)
    for name, rows in Router(fix.teachers).route([p.domain for p in PROMPTS]).items():
        idx = torch.tensor(rows)
        in_rows = torch.isin(torch.arange(len(PROMPTS)).repeat_interleave(batch.target_mask.sum(1)), idx)
        teacher_lp = sampler_logprobs(fix.teachers[name].model, batch, idx, sampling)
        expected[in_rows] = torch.where(corrected[in_rows], teacher_lp, expected[in_rows])
        if rule.rate == 1:  # every kept token passed the teacher's top-k rule
            with torch.no_grad():
                hidden, _ = forward_hidden(fix.teachers[name].model, batch.input_ids[idx], batch.attention_mask[idx])
                z = head_logits(batch.target_states(hidden, idx), fix.teachers[name].head)[:, :15]
            rank = (z > z.gather(-1, batch.target_ids(idx)[:, None])).sum(-1)
            assert bool((rank[~corrected[in_rows]] < rule.topk).all())
    torch.testing.assert_close(recorded, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decode", ["hf", "fast"])
def test_a_teacher_whose_rows_all_finished_stops_decoding(models: dict, monkeypatch: pytest.MonkeyPatch,
                                                          decode: str) -> None:
    student, sampling = load_model(models["student"]), RolloutConfig(max_new_tokens=6, decode=decode)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]  # the one row of domain b is routed to tb
    seed = next(s for s in range(50) if _first_token_unique_and_others_run_full(student, prompts, sampling, s))
    first = rollout(student, prompts, sampling, torch.Generator().manual_seed(seed)).input_ids[:, -6].tolist()
    student.model.generation_config.eos_token_id = [first[1]]  # the tb row ends at its first token
    fix = corrector(models, CorrectionConfig(topk=15), sampling, {"ta": models["teacher_a"], "tb": models["teacher_b"]})
    steps: dict[str, int] = {}

    def counting_start(lm, *args):  # count each teacher's decode steps, whichever path decodes it
        state, hidden = start_decode(lm, *args)
        steps[lm.name], step = 0, state.step

        def counted(*step_args):
            steps[lm.name] += 1
            return step(*step_args)

        state.step = counted
        return state, hidden

    monkeypatch.setattr(correction, "start_decode", counting_start)
    batch = rollout(student, prompts, sampling, torch.Generator().manual_seed(seed),
                    correction=fix.begin(prompts, 1))
    assert batch.completion_lengths()[1] == 1 and max(batch.completion_lengths()) == 6
    assert steps == {"ta": 5, "tb": 0}  # tb: the prefill only


def _first_token_unique_and_others_run_full(student, prompts: list[Prompt], sampling: RolloutConfig,
                                            seed: int) -> bool:
    batch = rollout(student, prompts, sampling, torch.Generator().manual_seed(seed))
    first = batch.input_ids[:, -6].tolist()
    return first[1] not in (first[0], first[2]) and batch.completion_lengths()[::2] == [6, 6]


def test_rate_schedule_hands_control_back() -> None:
    def schedule(cfg: CorrectionConfig) -> Corrector:
        return Corrector(cfg, SAMPLING[0], char_tokenizer(), {}, Router({}))

    decaying = schedule(CorrectionConfig(topk=2, rate=0.8, decay_steps=4))
    assert [round(decaying.rate(s), 6) for s in range(1, 7)] == [0.8, 0.6, 0.4, 0.2, 0.0, 0.0]
    assert decaying.begin([], 4) is not None and decaying.begin([], 5) is None  # no teacher decode at rate 0
    assert {schedule(CorrectionConfig(topk=2, rate=0.3)).rate(s) for s in (1, 50, 10_000)} == {0.3}


def test_trainer_logs_exact_corrected_fractions_and_stops_correcting_after_the_schedule(
        make_config, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, rollout={"correction": {"min_prob": 1.0, "decay_steps": 1}}, optim={"steps": 2})
    trainer = Trainer(cfg)
    first, second = trainer.train_step(), trainer.train_step()
    for row, rate in ((first, 1.0), (second, 0.0)):
        fractions = {v for k, v in row.items() if k.startswith("corrected_fraction")}  # overall and per teacher
        assert (row["correction_rate"], fractions) == (rate, {rate})


def test_per_teacher_corrected_fractions_add_up_by_token_share(make_config, tmp_path: Path) -> None:
    row = Trainer(make_config(tmp_path, rollout={"correction": {"topk": 3}})).train_step()
    teachers = [k.removeprefix("token_share/teacher/") for k in row if k.startswith("token_share/teacher/")]
    assert sorted(teachers) == ["ta", "tb"] and all(f"corrected_fraction/teacher/{t}" in row for t in teachers)
    by_teacher = sum(row[f"corrected_fraction/teacher/{t}"] * row[f"token_share/teacher/{t}"] for t in teachers)
    assert 0 < row["corrected_fraction"] < 1
    assert by_teacher == pytest.approx(row["corrected_fraction"], rel=1e-9)


def test_resume_continues_the_corrected_rollouts_exactly(make_config, tmp_path: Path) -> None:
    opts = {"optim": {"steps": 4}, "rollout": {"correction": {"topk": 3, "rate": 0.9, "decay_steps": 6}}}
    train(make_config(tmp_path / "full", **opts))
    train(make_config(tmp_path / "split", **opts), stop_after=2)
    train(make_config(tmp_path / "split", **opts), resume=True)
    full, split = (read_metrics(tmp_path / run) for run in ("full", "split"))
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert 0 < split[2]["corrected_fraction"] < 1  # after the resume, corrections still draw from their stream
    for a, b in zip(full, split, strict=True):
        assert (a["loss"], a["corrected_fraction"]) == (b["loss"], b["corrected_fraction"])


def test_different_tokenizer_is_refused(models: dict) -> None:
    with pytest.raises(ValueError, match=r"rollout.correction.*'odd'.*maps tokens to ids differently"):
        corrector(models, CorrectionConfig(topk=2), SAMPLING[0], {"odd": models["other_tok"]})


@pytest.mark.parametrize(("correction", "loss", "message"), [
    ({"topk": -1}, {}, "rollout.correction.topk"),
    ({"min_prob": 1.5}, {}, "rollout.correction.min_prob"),
    ({}, {}, "rejects nothing"),
    ({"topk": 2, "rate": 2.0}, {}, "rollout.correction.rate"),
    ({"topk": 2, "decay_steps": -1}, {}, "rollout.correction.decay_steps"),
    ({"topk": 2}, {"signal": "sampled"}, "loss.signal = 'sampled'"),
    ({"topk": 2}, {"verifier_weight": 1.0, "verifiers": {"a": "m:f"}}, "loss.verifier_weight"),
])
def test_invalid_correction_configs_name_the_key(make_config, tmp_path: Path, correction: dict, loss: dict,
                                                 message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, rollout={"correction": correction}, loss=loss)


def test_async_mode_corrects_by_the_rollout_step_schedule(make_config, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, run={"max_staleness": 1, "threads": 2}, optim={"steps": 3},
                      rollout={"correction": {"min_prob": 1.0, "decay_steps": 2}})
    train(cfg)
    rows = [r for r in read_metrics(tmp_path) if r.get("kind") != "eval"]
    assert [r["correction_rate"] for r in rows] == [1.0, 0.5, 0.0]
    assert rows[0]["corrected_fraction"] == 1.0 and rows[2]["corrected_fraction"] == 0.0
    assert 0.0 <= rows[1]["corrected_fraction"] <= 1.0
