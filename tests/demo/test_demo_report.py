"""The report's statistics: standard errors and the paired difference against the best off-policy arm,
checked against values computed by hand."""

import math

import pytest

from opd_fast.demo.report import ArmResult, domain_rows, mean_se, paired_difference, report_text, verdict_lines


def test_mean_se_by_hand():
    # values 0.5, 0.7, 0.9: mean 0.7, sample std 0.2, SE 0.2 / sqrt(3)
    mean, se = mean_se([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and se == pytest.approx(0.2 / math.sqrt(3))
    assert mean_se([0.4]) == (0.4, None)
    with pytest.raises(ValueError, match="at least one"):
        mean_se([])


def test_paired_difference_pairs_by_seed():
    # per-seed differences 0.1, 0.3 (seed 2 exists only in a): mean 0.2, std sqrt(0.02), SE 0.1
    mean, se = paired_difference({0: 0.6, 1: 0.8, 2: 0.0}, {0: 0.5, 1: 0.5})
    assert mean == pytest.approx(0.2) and se == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no seed"):
        paired_difference({0: 1.0}, {1: 1.0})


def _run(arm: str, seed: int, t1: float, off_policy: bool) -> ArmResult:
    return ArmResult(arm=arm, label=arm, student="main", seed=seed, off_policy=off_policy,
                     greedy_accuracy={"d": t1}, sampled_accuracy={"d": t1}, reverse_kl={"d": 0.0})


@pytest.mark.parametrize("on_policy, beats", [
    ((0.70, 0.72, 0.74), True),    # +0.10 over sft every seed (SE 0), +0.06..0.14 over seqkd
    ((0.70, 0.52, 0.74), False),   # seed 1 falls behind: the mean lead is within 2 SE
])
def test_difference_against_the_best_off_policy_arm(on_policy, beats):
    sft, seqkd = (0.60, 0.62, 0.64), (0.55, 0.58, 0.60)
    results = [_run("sft", s, v, True) for s, v in enumerate(sft)]
    results += [_run("seqkd", s, v, True) for s, v in enumerate(seqkd)]
    results += [_run("on_policy", s, v, False) for s, v in enumerate(on_policy)]
    rows = {r["arm"]: r for r in domain_rows(results, "d", "main")}
    row = rows["on_policy"]
    assert row["best_off_policy"] == "sft"  # higher mean T=1 accuracy than seqkd
    expected = mean_se([a - b for a, b in zip(on_policy, sft, strict=True)])
    assert (row["diff_vs_best_off_policy"], row["diff_vs_best_off_policy_se"]) == pytest.approx(expected)
    assert row["beats_every_off_policy"] is beats
    assert "diff_vs_best_off_policy" not in rows["sft"]


def test_a_single_seed_never_passes():
    results = [_run("sft", 0, 0.1, True), _run("on_policy", 0, 0.9, False)]
    row = {r["arm"]: r for r in domain_rows(results, "d", "main")}["on_policy"]
    assert row["diff_vs_best_off_policy_se"] is None and row["beats_every_off_policy"] is False


def test_a_single_seed_gets_the_evaluations_binomial_se():
    # on 100 prompts: SE(0.5) = 0.05, SE(0.2) = 0.04, SE of the difference sqrt(0.05^2 + 0.04^2)
    results = [_run("sft", 0, 0.2, True), _run("on_policy", 0, 0.5, False)]
    rows = {r["arm"]: r for r in domain_rows(results, "d", "main", prompts=100)}
    assert rows["sft"]["sampled_accuracy_se"] == pytest.approx(0.04)
    assert rows["on_policy"]["greedy_accuracy_se"] == pytest.approx(0.05)
    assert rows["on_policy"]["diff_vs_best_off_policy"] == pytest.approx(0.3)
    assert rows["on_policy"]["diff_vs_best_off_policy_se"] == pytest.approx(math.sqrt(0.05**2 + 0.04**2))
    assert rows["on_policy"]["beats_every_off_policy"] is False  # 0.3 > 2 SE, but one seed is not the bar


def test_the_bar_needs_three_seeds():
    results = [_run(arm, s, v, arm == "sft") for s in (0, 1) for arm, v in (("sft", 0.2 + s / 10), ("on", 0.9))]
    row = {r["arm"]: r for r in domain_rows(results, "d", "main")}["on"]
    assert row["diff_vs_best_off_policy"] > 2 * row["diff_vs_best_off_policy_se"]
    assert row["beats_every_off_policy"] is False


@pytest.mark.parametrize("on_policy, seeds, status", [
    ((0.70, 0.72, 0.74), 3, "clears the bar"),
    ((0.70, 0.52, 0.74), 3, "does not clear the bar"),
    ((0.70, 0.72), 2, "does not clear the bar (it needs >= 3 seeds)"),
])
def test_the_verdict_names_the_arm_closest_to_the_bar(on_policy, seeds, status):
    sft = (0.60, 0.62, 0.64)[:seeds]
    results = [_run("sft", s, v, True) for s, v in enumerate(sft)]
    results += [_run("weaker_on_policy", s, v - 0.2, False) for s, v in enumerate(on_policy)]
    results += [_run("on_policy", s, v, False) for s, v in enumerate(on_policy)]
    summary = {"main": {"d": domain_rows(results, "d", "main")}}
    (line,) = verdict_lines(summary)
    lead = mean_se([a - b for a, b in zip(on_policy, sft, strict=True)])[0]
    assert line.startswith(f"d, the student: best on-policy arm on_policy {lead:+.3f} ± ")
    assert line.endswith(f"against sft, {seeds} seed(s): {status}")
    assert line in report_text(summary, markdown=True) and line in report_text(summary, markdown=False)
