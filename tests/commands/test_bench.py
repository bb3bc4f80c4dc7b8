import json

import pytest

from opd_fast.benchmarking import runner, worker
from opd_fast.cli import main


def _in_process_worker(monkeypatch):
    """The subprocess path is covered by tests/benchmarking/test_worker.py; here it is skipped for speed."""
    monkeypatch.setattr(runner, "run_in_subprocess", lambda spec, timeout=None: worker.measure(spec))


def test_bench_loss_end_to_end_writes_json_csv_and_plot(tmp_path, capsys, monkeypatch):
    _in_process_worker(monkeypatch)
    out = tmp_path / "r"
    code = main(["bench", "loss", "--shapes", "32x16x256", "--dtypes", "fp32", "--backends", "torch",
                 "--peers", "naive", "--repeats", "2", "--seed", "5",
                 "--json", f"{out}.json", "--csv", f"{out}.csv", "--plot", f"{out}.png"])
    assert code == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert "--seed 5" in data["command"] and data["config"]["repeats"] == 2
    by_impl = {r["impl"]: r for r in data["results"]}
    assert set(by_impl) == {"gemm-floor", "opd_fast:torch", "naive"}
    for rec in by_impl.values():
        assert rec["status"] == "ok", rec
        assert rec["repeats"] == 2 and rec["first_call_s"] > 0 and rec["peak_extra_mb"] is not None
        assert rec["ratio_to_floor"] > 0
    assert by_impl["naive"]["rel_err"] < 1e-4
    assert (tmp_path / "r.png").stat().st_size > 0 and (tmp_path / "r.csv").read_text().count("\n") == 4
    assert "opd_fast:torch" in capsys.readouterr().out


def test_bench_memory_reports_every_n(tmp_path, capsys, monkeypatch):
    _in_process_worker(monkeypatch)
    code = main(["bench", "memory", "--ns", "64,128", "--vocab", "512", "--hidden", "16", "--dtype", "fp32",
                 "--backends", "torch", "--peers", "naive", "--json", str(tmp_path / "m.json")])
    assert code == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert sorted((r["n"], r["impl"]) for r in data["results"]) == sorted(
        (n, impl) for n in (64, 128) for impl in ("gemm-floor", "opd_fast:torch", "naive")
    )
    assert all(r["repeats"] == 0 and r["status"] == "ok" for r in data["results"])
    assert "| N |" not in capsys.readouterr().out  # plain table unless --markdown


def test_bench_report_merges_runs(tmp_path, capsys, monkeypatch):
    _in_process_worker(monkeypatch)
    for n in (32, 64):
        main(["bench", "loss", "--shapes", f"{n}x16x256", "--dtypes", "fp32", "--backends", "torch", "--peers", "",
              "--repeats", "1", "--json", str(tmp_path / f"{n}.json")])
    capsys.readouterr()
    assert main(["bench", "report", str(tmp_path / "32.json"), str(tmp_path / "64.json"), "--markdown",
                 "--csv", str(tmp_path / "all.csv")]) == 0
    text = capsys.readouterr().out
    assert text.count("| 32 | 256 |") == 2 and text.count("| 64 | 256 |") == 2


@pytest.mark.parametrize("command", ["loss", "memory", "report", "e2e"])
def test_help_shows_real_defaults_and_no_empty_ones(command, capsys):
    with pytest.raises(SystemExit):
        main(["bench", command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help lines wrap anywhere
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text
    if command != "report":
        assert "(default: " in text
    if command == "loss":
        assert "(default: small)" in text and "NxHxV" in text


@pytest.mark.parametrize(("argv", "match"), [
    (["loss", "--shapes", "2048x32768x1024", "--peers", ""], "NxHxV"),
    (["e2e", "--vocab", "512,big"], "--vocab must be"),
    (["e2e", "--steps", "2", "--warmup-steps", "2"], "nothing measured"),
    (["e2e", "--arms", "verl"], "an arm is"),
])
def test_bad_arguments_are_clear_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        main(["bench", *argv])
