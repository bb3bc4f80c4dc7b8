import json

import pytest

from opd_fast.benchmarking import e2e
from opd_fast.benchmarking.e2e import Arm, ArmResult, E2EConfig, ModelSpec
from opd_fast.cli import main

TOY = ModelSpec(128, teacher_hidden=16, teacher_layers=1, student_hidden=8, student_layers=1, heads=2)


@pytest.mark.parametrize(("text", "want"), [
    ("trl-gkd", Arm("trl-gkd", "trl-gkd")),
    ('opd-fast-strict=run.pipeline="strict";rollout.micro_batch_size=4',
     Arm("opd-fast-strict", "opd-fast", ('run.pipeline="strict"', "rollout.micro_batch_size=4"))),
])
def test_arms_parse_and_round_trip(text, want):
    assert Arm.parse(text) == want and Arm.parse(want.spec) == want


@pytest.mark.parametrize(("text", "match"), [("verl", "an arm is"), ("opd-fast=run.pipeline", "KEY=VALUE")])
def test_bad_arms_are_clear_errors(text, match):
    with pytest.raises(ValueError, match=match):
        Arm.parse(text)


def test_models_and_prompts_are_saved_once_per_spec(tmp_path):
    cfg = E2EConfig(cache_dir=str(tmp_path), num_prompts=4, models={128: TOY})
    root = e2e.prepare(cfg, 128)
    assert {p.name for p in root.iterdir()} == {"teacher", "student", e2e.PROMPTS_FILE, e2e.MODEL_SPEC_FILE}
    config = json.loads((root / "student" / "config.json").read_text())
    assert config["vocab_size"] == 128 and config["hidden_size"] == 8
    assert json.loads((root / "teacher" / "config.json").read_text())["hidden_size"] == 16
    stamp = (root / "student" / "model.safetensors").stat().st_mtime_ns
    assert e2e.prepare(cfg, 128) == root and (root / "student" / "model.safetensors").stat().st_mtime_ns == stamp
    rows = [json.loads(line) for line in (root / e2e.PROMPTS_FILE).read_text().splitlines()]
    a, b = (int(x) for x in rows[0]["prompt"].removeprefix("What is ").split("?")[0].split(" + "))
    assert len(rows) == 4 and rows[0]["answer"] == str(a + b)


def _fake_worker(calls):
    def run_arm(arm, vocab, root, cfg, out_dir):
        calls.append(arm.name)
        if arm.name == "opd-fast-broken":
            return {"status": "error", "reason": "worker exited 1: ValueError: unknown config key"}
        per_step = {"trl-gkd": 100, "opd-fast-serial": 300}[arm.name]
        steps = [{"wall_s": 1.0, "tokens": per_step * (i + 1), "stages": {"rollout": 0.5}} for i in range(3)]
        return {"status": "ok", "steps": steps, "peak_rss_mb": 500.0 + len(calls)}

    return run_arm


def test_rounds_rotate_skip_warmup_and_keep_failures(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(e2e, "run_arm", _fake_worker(calls))
    arms = (Arm("trl-gkd", "trl-gkd"), Arm.parse("opd-fast-serial=run.pipeline=\"serial\""),
            Arm.parse("opd-fast-broken=run.max_staleness=1"))
    cfg = E2EConfig(vocab_sizes=(128,), arms=arms, steps=3, warmup_steps=1, rounds=2, cache_dir=str(tmp_path),
                    num_prompts=2, models={128: TOY})
    results = {r.arm: r for r in e2e.run_e2e(cfg, tmp_path / "runs", log=lambda msg: None)}
    assert calls == ["trl-gkd", "opd-fast-serial", "opd-fast-broken", "opd-fast-serial", "trl-gkd"]
    serial = results["opd-fast-serial"]
    assert [s["tokens"] for s in serial.steps] == [600, 900, 600, 900]  # the warm-up step of each process left out
    assert serial.tokens_per_s.median == 750 and serial.peak_rss_mb == 504.0  # the worst process's peak
    assert results["opd-fast-broken"].status == "error" and not results["opd-fast-broken"].steps
    table = e2e.format_markdown(list(results.values()), cfg)
    assert "| 128 | 2 | opd-fast-serial | 750 (600-900) | 3.00 |" in table
    assert "error: worker exited 1" in table
    e2e.plot(list(results.values()), tmp_path / "e2e.png", "t")  # the failed arm has no bar, and no crash
    assert (tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"
    record = e2e.to_json(list(results.values()), cfg, {"command": "x"})
    assert record["results"][1]["tokens_per_s"] == {"median": 750, "min": 600, "max": 900}
    assert record["config"]["arms"][1] == 'opd-fast-serial=run.pipeline="serial"'


def test_stage_medians_over_steps():
    r = ArmResult("a", 8, steps=[{"wall_s": 1, "tokens": 1, "stages": {"rollout": t, "learn": 0.1}} for t in (1, 2, 9)])
    assert r.stage_medians() == {"rollout": 2, "learn": 0.1}


@pytest.mark.slow
def test_quick_mode_runs_both_sides_end_to_end(tmp_path, capsys, monkeypatch):
    """Real subprocesses: opd-fast train and TRL's GKDTrainer on the toy models (tens of seconds). The cache and
    run directories are relative, as with the command's defaults."""
    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--quick", "--cache-dir", "cache", "--out-dir", "runs",
                 "--json", str(out), "--plot", str(tmp_path / "e2e.png")]) == 0
    data = json.loads(out.read_text())
    by_arm = {r["arm"]: r for r in data["results"]}
    assert set(by_arm) == {"trl-gkd", "opd-fast-serial"}
    for rec in by_arm.values():
        assert rec["status"] == "ok", rec
        assert len(rec["steps"]) == 2 and rec["peak_rss_mb"] > 100
        assert all(1 <= s["tokens"] <= 8 for s in rec["steps"])  # batch 2 x at most 4 new tokens, EOS included
    assert {"rollout", "score", "learn"} <= set(by_arm["opd-fast-serial"]["stage_medians_s"])
    assert "| 512 | 1 | opd-fast-serial |" in capsys.readouterr().out
    assert (tmp_path / "e2e.png").is_file()


def test_trl_runs_at_its_fastest_fair_setting(tmp_path):
    """No activation checkpointing (it would also turn the KV cache off in generation), fp32 like opd-fast,
    constant lr, forward KL: the settings the comparison promises."""
    from opd_fast.benchmarking.e2e_worker import _common_args

    cfg = {"batch_size": 8, "steps": 12, "lr": 1e-4, "seed": 0}
    args = _common_args(cfg, tmp_path)
    assert args["gradient_checkpointing"] is False and args["bf16"] is False and args["fp16"] is False
    assert args["lr_scheduler_type"] == "constant" and args["learning_rate"] == 1e-4 and args["beta"] == 0.0
    assert args["per_device_train_batch_size"] == 8 and args["gradient_accumulation_steps"] == 1
