import json

import matplotlib.pyplot as plt
import pytest

from opd_fast.plotting import dashboard
from opd_fast.plotting.dashboard import DASHBOARD_FILE, plot_run

STEP_ROW = {"loss": 1.0, "divergence/teacher/ta": 0.9, "divergence/domain/a": 0.8, "tokens_per_s": 500.0,
            "step_time": 0.5, "time/rollout": 0.3, "time/score": 0.1, "time/learn": 0.1, "idle/score": 0.4,
            "overlap_efficiency": 1.0, "lr": 1e-4, "grad_norm": 0.5, "completion_len": 12.0, "truncation_rate": 0.0,
            "student_entropy": 2.0, "tokens": 96, "skipped_steps": 0, "source": "student", "staleness_mean": 0.5}
EVAL_ROW = {"kind": "eval", "greedy/accuracy": 0.25, "greedy/accuracy/a": 0.5, "sampled/accuracy": 0.2,
            "reverse_kl": 0.7, "reverse_kl/a": 0.6}


def _run_dir(tmp_path, steps=3):
    rows = [{"step": s, **STEP_ROW} for s in range(1, steps + 1)] + [{"step": steps, **EVAL_ROW}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_every_metric_lands_in_exactly_one_titled_panel():
    series = dashboard._series([{"step": 1, **STEP_ROW}, {"step": 1, **EVAL_ROW}])
    panels = dashboard._assign(series)
    placed = [k for _, keys in panels for k in keys]
    assert sorted(placed) == sorted(series) and len(placed) == len(set(placed))
    by_title = {p.title: keys for p, keys in panels}
    assert set(by_title["Training loss and divergence"]) == {"loss", "divergence/teacher/ta", "divergence/domain/a",
                                                              "eval/reverse_kl", "eval/reverse_kl/a"}
    assert set(by_title["Evaluation accuracy"]) == {"eval/greedy/accuracy", "eval/greedy/accuracy/a",
                                                     "eval/sampled/accuracy"}
    assert by_title["Staleness mean"] == ["staleness_mean"]  # an unknown metric still gets a panel
    assert not {"tokens", "skipped_steps", "source"} & set(placed)


def test_dashboard_panels_have_titles_and_units_not_raw_keys(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    plot_run(_run_dir(tmp_path))
    axes = [ax for ax in figures[0].axes if ax.get_visible()]
    titles = {ax.get_title() for ax in axes}
    assert {"Throughput", "Step and stage times", "Evaluation accuracy", "Learning rate"} <= titles
    assert all(ax.get_ylabel() for ax in axes if ax.get_title() != "Staleness mean")
    labels = {t.get_text() for ax in axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert {"teacher ta", "greedy, domain a", "eval reverse KL, domain a", "rollout"} <= labels
    raw = {k for k in (*STEP_ROW, *EVAL_ROW) if "/" in k or "_" in k}
    assert raw and not labels & raw


def test_writes_the_dashboard_and_per_metric_files_on_request(tmp_path):
    rows = [{"step": 1, "loss": 1.0, "time/rollout": 0.3}, {"step": 2, "loss": 0.5, "time/rollout": 0.2},
            {"step": 2, "kind": "eval", "reverse_kl": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.name for p in plot_run(tmp_path)] == [DASHBOARD_FILE]
    paths = plot_run(tmp_path, tmp_path / "out", each=True)
    assert [p.name for p in paths] == [DASHBOARD_FILE, "eval_reverse_kl.png", "loss.png", "time_rollout.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_no_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"no metrics to plot in .*metrics\.jsonl"):
        plot_run(tmp_path)
