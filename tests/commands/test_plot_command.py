import json

import pytest

from opd_fast.cli import main


def test_plot_writes_the_dashboard_and_each_metric(tmp_path, capsys):
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "tokens_per_s": 100.0} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "dashboard.png").is_file() and not (tmp_path / "plots" / "loss.png").exists()
    assert main(["plot", str(tmp_path), "--each", "--out", str(tmp_path / "o")]) == 0
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"dashboard.png", "loss.png", "lr.png", "tokens_per_s.png"}
    assert "3 per-metric plots" in capsys.readouterr().out


def test_plot_timeline_prints_the_overlap_efficiency(tmp_path, capsys):
    rows = [{"step": s, "stage": stage, "lane": lane, "micro_batch": 0, "start": s + a, "end": s + b}
            for s in (1, 2, 3) for stage, lane, a, b in (("rollout", "main", 0.0, 0.6), ("score", "w", 0.2, 1.0))]
    (tmp_path / "timeline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(tmp_path), "--timeline", "--steps", "2:3"]) == 0
    assert "steps 2-3: overlap efficiency 1.40" in capsys.readouterr().out  # (2 x 1.4 s busy) / 2.0 s wall
    assert (tmp_path / "plots" / "timeline_steps2-3.png").is_file()
    assert main(["plot", str(tmp_path), "--timeline"]) == 0  # default: the last step
    assert "step 3: overlap efficiency 1.40" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "error", "match"), [
    (["--timeline"], FileNotFoundError, "timeline.jsonl not found"),
    (["--steps", "2"], ValueError, "add --timeline"),
    ([], ValueError, "no metrics to plot"),
])
def test_plot_errors_are_clear(tmp_path, argv, error, match):
    with pytest.raises(error, match=match):
        main(["plot", str(tmp_path), *argv])
