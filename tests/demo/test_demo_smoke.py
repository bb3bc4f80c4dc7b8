"""The demo end to end on a tiny profile: same code path as ``opd-fast demo``, a few steps per stage."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from opd_fast.cli import build_parser
from opd_fast.demo import prepare
from opd_fast.demo.arms import ARMS_BY_NAME, DEFAULT_ARMS, WEAK_ARMS, DemoData, run_config
from opd_fast.demo.domains import DOMAINS
from opd_fast.demo.prepare import prepare_teacher
from opd_fast.demo.profiles import QUICK
from opd_fast.demo.report import merge_results
from opd_fast.demo.run import run_demo
from opd_fast.runner.score import Router

TINY = replace(QUICK, name="tiny", teacher_max_steps=4, student_max_steps=4, check_every=2, dev_prompts=4,
               arm_steps=2, arm_batch=4, eval_prompts=4, train_prompts=32)
DOMAIN_NAMES = [d.name for d in DOMAINS]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = run_demo(TINY, [0], list(DEFAULT_ARMS), root / "out", root / "cache", weak_arms=list(WEAK_ARMS))
    return root, summary


def test_every_arm_is_reported_per_domain_with_its_budget(demo_run):
    _, summary = demo_run
    assert list(summary) == ["main", "weak"] and list(summary["main"]) == DOMAIN_NAMES
    for domain in DOMAIN_NAMES:
        by_arm = {r["arm"]: r for r in summary["main"][domain]}
        assert list(by_arm) == ["specialist", "start", *DEFAULT_ARMS]
        for row in by_arm.values():
            assert 0 <= row["greedy_accuracy"] <= 1 and 0 <= row["sampled_accuracy"] <= 1
            assert row["reverse_kl"] >= 0
        # SFT never queries the teacher; SeqKD's tokens are all teacher samples; on-policy ones never are.
        assert by_arm["sft"]["teacher_scored_tokens"] == 0 and by_arm["sft"]["student_grad_tokens"] > 0
        seqkd = by_arm["seqkd"]
        assert seqkd["teacher_generated_tokens"] == seqkd["teacher_scored_tokens"] > 0
        for arm in ("supervised_kd", "on_policy_rkl", "on_policy_jsd"):
            assert by_arm[arm]["teacher_generated_tokens"] == 0
            assert by_arm[arm]["teacher_scored_tokens"] == by_arm[arm]["student_grad_tokens"] > 0
        # Supervised KD trains on references: 4 prompts x 2 steps of 11 (column_add) or 13 (pair_sum) tokens.
        assert 8 * 11 <= by_arm["supervised_kd"]["teacher_scored_tokens"] <= 8 * 13
        assert by_arm["on_policy_rkl"]["best_off_policy"] in ("sft", "supervised_kd", "seqkd")
        weak = {r["arm"]: r for r in summary["weak"][domain]}
        assert list(weak) == ["specialist", "start", *WEAK_ARMS]


def test_outputs_are_written(demo_run):
    root, _ = demo_run
    out = root / "out"
    payload = json.loads((out / "results.json").read_text())
    assert payload["meta"]["profile"] == "tiny"
    assert len(payload["runs"]) == len(DOMAINS) + (1 + len(DEFAULT_ARMS)) + (1 + len(WEAK_ARMS))
    for domain in DOMAIN_NAMES:
        assert (out / f"accuracy_{domain}.png").stat().st_size > 1000
    text = (out / "results.md").read_text()
    assert "### pair_sum, the student" in text and "| on-policy rev KL |" in text


def test_prepared_models_are_cached(demo_run):
    root, _ = demo_run
    cache = root / "cache"
    path, recipe = prepare_teacher(TINY, cache, DOMAINS[1])
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again, recipe_again = prepare_teacher(TINY, cache, DOMAINS[1])
    assert again == path and recipe_again == recipe and recipe["domains"] == ["pair_sum"]
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert (cache / "teacher-pair_sum").resolve() == path.resolve()
    assert (cache / "student-seed0" / "recipe.json").is_file()
    assert (cache / "weak-student-seed0" / "recipe.json").is_file()


def test_shipped_models_are_used_unless_retrained(demo_run, tmp_path, monkeypatch):
    root, _ = demo_run
    trained, recipe = prepare_teacher(TINY, root / "cache", DOMAINS[0])
    shipped = tmp_path / "shipped"
    shutil.copytree(trained, shipped / trained.name)
    (shipped / trained.name / "recipe.json").write_text(json.dumps({**recipe, "shipped": True}))
    monkeypatch.setattr(prepare, "SHIPPED", shipped)
    path, used = prepare_teacher(TINY, tmp_path / "cache", DOMAINS[0])
    assert used["shipped"] and (path / "model.safetensors").is_file()
    _, retrained = prepare_teacher(TINY, tmp_path / "cache", DOMAINS[0], retrain=True)
    assert "shipped" not in retrained and retrained["steps"] == TINY.teacher_max_steps


def test_merge(demo_run, tmp_path):
    root, summary = demo_run
    assert merge_results([root / "out"], tmp_path / "merged") == summary
    with pytest.raises(ValueError, match="repeat"):
        merge_results([root / "out", root / "out"], tmp_path / "twice")


@pytest.mark.slow  # two spawned workers, each importing torch and training its share
def test_seeds_in_parallel_workers_merge_into_one_report(demo_run, tmp_path):
    root, _ = demo_run
    summary = run_demo(TINY, [0, 1], ["sft", "on_policy_rkl"], tmp_path / "out", root / "cache",
                       weak_arms=["on_policy_rkl"], jobs=2)
    rows = {r["arm"]: r for r in summary["main"]["pair_sum"]}
    assert rows["on_policy_rkl"]["seeds"] == [0, 1] and rows["on_policy_rkl"]["sampled_accuracy_se"] is not None
    assert rows["on_policy_rkl"]["best_off_policy"] == "sft"
    assert [r["arm"] for r in summary["weak"]["pair_sum"]] == ["specialist", "start", "on_policy_rkl"]
    for unit in ("seed0-main", "seed1-main", "seed0-weak", "seed1-weak"):
        assert (tmp_path / "out" / unit / "results.json").is_file()
    meta = json.loads((tmp_path / "out" / "results.json").read_text())["meta"]
    assert meta["seeds"] == [0, 1] and meta["arms"] == ["sft", "on_policy_rkl"]
    assert meta["weak_arms"] == ["on_policy_rkl"]
    # every seed trains from seed 0's start (the shared start), and the specialists are evaluated once
    assert {s: r["start_seed"] for s, r in meta["students"].items()} == {"0": 0, "1": 0}
    assert sum(r["arm"] == "specialist" for r in json.loads((tmp_path / "out" / "results.json").read_text())["runs"]) \
        == len(DOMAINS)


def test_seeds_share_the_start_and_differ_after_it(demo_run, tmp_path):
    root, _ = demo_run
    summary = run_demo(TINY, [0, 1], ["sft"], tmp_path / "out", root / "cache")
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    start = [r for r in runs if r["arm"] == "start"]
    assert len(start) == 2 and start[0]["greedy_accuracy"] == start[1]["greedy_accuracy"]
    assert (tmp_path / "out" / "seed1" / "main" / "sft" / "student" / "model.safetensors").is_file()
    weights = [load_file(tmp_path / "out" / f"seed{s}" / "main" / "sft" / "student" / "model.safetensors")
               for s in (0, 1)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the prompt order is the seed's
    assert summary["main"]["pair_sum"][-1]["seeds"] == [0, 1]


def test_each_domain_is_routed_to_its_specialist(tmp_path):
    teachers = {d.name: tmp_path / f"t-{d.name}" for d in DOMAINS}
    data = DemoData(tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    config = run_config(ARMS_BY_NAME["on_policy_rkl"], TINY, tmp_path / "s", teachers, data, tmp_path / "o", 0)
    router = Router(config.teachers)
    assert {d: router.teacher_for(d) for d in DOMAIN_NAMES} == {d: d for d in DOMAIN_NAMES}
    assert config.teachers["pair_sum"].path == str(teachers["pair_sum"])
    assert config.data.mixture == {d: 1.0 for d in DOMAIN_NAMES}
    assert set(config.loss.verifiers) == set(DOMAIN_NAMES)
    assert config.rollout.correction is None
    corrected = run_config(ARMS_BY_NAME["corrected_rkl"], TINY, tmp_path / "s", teachers, data, tmp_path / "o", 0)
    assert corrected.rollout.correction == TINY.correction


def test_cli_options():
    args = build_parser().parse_args(["demo", "--quick", "--seeds", "3", "--out", "x", "--arms", "sft,seqkd",
                                      "--weak-arms", "", "--retrain", "--own-starts"])
    assert args.quick and args.seeds == 3 and args.out == "x" and args.arms == "sft,seqkd"
    assert args.weak_arms == "" and args.retrain and args.own_starts


def test_unknown_arm_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arm"):
        run_demo(TINY, [0], ["nope"], tmp_path / "o", tmp_path / "c")
