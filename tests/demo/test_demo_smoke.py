"""The demo end to end on a tiny profile: same code path as ``opd-fast demo``, a few steps per stage."""

import json
from dataclasses import replace

import pytest

from opd_fast.cli import build_parser
from opd_fast.demo.arms import DEFAULT_ARMS
from opd_fast.demo.prepare import prepare_teacher
from opd_fast.demo.profiles import QUICK
from opd_fast.demo.report import merge_results
from opd_fast.demo.run import run_demo

TINY = replace(QUICK, name="tiny", teacher_max_steps=4, student_max_steps=4, check_every=2, dev_prompts=8,
               arm_steps=2, arm_batch=4, eval_prompts=8, eval_points=2, train_prompts=64)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    rows = run_demo(TINY, [0], list(DEFAULT_ARMS), root / "out", root / "cache")
    return root, rows


def test_every_arm_is_reported_with_its_budget(demo_run):
    _, rows = demo_run
    by_arm = {r["arm"]: r for r in rows}
    assert list(by_arm) == ["start", *DEFAULT_ARMS]
    for row in rows:
        assert 0 <= row["greedy_accuracy"] <= 1 and 0 <= row["sampled_accuracy"] <= 1
        assert row["reverse_kl"] >= 0
    # SFT never queries the teacher; SeqKD's tokens are all teacher samples; on-policy ones never are.
    assert by_arm["sft"]["teacher_scored_tokens"] == 0 and by_arm["sft"]["student_grad_tokens"] > 0
    seqkd = by_arm["seqkd"]
    assert seqkd["teacher_generated_tokens"] == seqkd["teacher_scored_tokens"] > 0
    for arm in ("supervised_kd", "on_policy_fkl", "on_policy_rkl", "on_policy_jsd"):
        assert by_arm[arm]["teacher_generated_tokens"] == 0
        assert by_arm[arm]["teacher_scored_tokens"] == by_arm[arm]["student_grad_tokens"] > 0
    # Supervised KD trains on the references: 4 prompts x 2 steps x (10-char tagged answer + EOS).
    assert by_arm["supervised_kd"]["teacher_scored_tokens"] == 4 * 2 * 11


def test_outputs_are_written(demo_run):
    root, _ = demo_run
    out = root / "out"
    payload = json.loads((out / "results.json").read_text())
    assert payload["meta"]["profile"] == "tiny" and len(payload["runs"]) == 1 + len(DEFAULT_ARMS)
    curves = [r["curve"] for r in payload["runs"] if r["arm"] == "on_policy_rkl"]
    assert len(curves[0]) == 2 and curves[0][0][0] < curves[0][1][0]  # evaluated twice, tokens growing
    assert "| on-policy rev KL |" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000


def test_prepared_models_are_cached(demo_run):
    root, _ = demo_run
    cache = root / "cache"
    path, recipe = prepare_teacher(TINY, cache)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again, recipe_again = prepare_teacher(TINY, cache)
    assert again == path and recipe_again == recipe
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert (cache / "teacher").resolve() == path.resolve()
    assert (cache / "student-seed0" / "recipe.json").is_file()


def test_merge(demo_run, tmp_path):
    root, rows = demo_run
    assert merge_results([root / "out"], tmp_path / "merged") == rows
    with pytest.raises(ValueError, match="repeat"):
        merge_results([root / "out", root / "out"], tmp_path / "twice")


def test_cli_options():
    args = build_parser().parse_args(["demo", "--quick", "--seeds", "3", "--out", "x", "--arms", "sft,seqkd"])
    assert args.quick and args.seeds == 3 and args.out == "x" and args.arms == "sft,seqkd"


def test_unknown_arm_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arm"):
        run_demo(TINY, [0], ["nope"], tmp_path / "o", tmp_path / "c")
