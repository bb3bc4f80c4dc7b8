import csv
import json

import pytest

from opd_fast.benchmarking import report
from opd_fast.benchmarking.runner import BenchConfig, CaseResult
from opd_fast.benchmarking.shapes import Shape

SHAPE = Shape(2048, 32768, 1024, 1024)


def _results():
    return [
        CaseResult(SHAPE, "fp32", "gemm-floor", first_call_s=4.0, peak_extra_mb=400.0, runs_s=[3.0, 3.2, 2.9],
                   ratio_to_floor=1.0),
        CaseResult(SHAPE, "fp32", "opd_fast:torch", rel_err=1e-6, first_call_s=5.0, peak_extra_mb=600.0,
                   runs_s=[4.0, 4.5, 3.9], ratio_to_floor=4.0 / 3.0),
        CaseResult(SHAPE, "fp32", "naive", status="oom", reason="would need ~30.0 GiB", estimated_mb=30720.0),
    ]


def test_table_is_aligned_and_says_why_a_case_was_skipped():
    lines = report.format_table(_results()).splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines[:2]}) == 1
    assert "4.000 (3.900-4.500)" in lines[3] and "1.33" in lines[3]
    assert "oom: would need ~30.0 GiB" in lines[4]
    md = report.format_markdown(_results()).splitlines()
    assert md[0].startswith("| N | V |") and len(md) == 5


def test_json_records_the_command_and_round_trips(tmp_path):
    path = tmp_path / "r.json"
    meta = report.metadata(BenchConfig(seed=7), argv=["bench", "loss", "--seed", "7"])
    report.write_json(path, _results(), meta)
    data = json.loads(path.read_text())
    assert data["command"] == "opd-fast bench loss --seed 7"
    assert data["config"]["seed"] == 7 and data["inputs"]["logit_std"] > 0 and data["cpu"]
    assert data["results"][1]["median_s"] == 4.0 and data["results"][1]["repeats"] == 3
    meta2, loaded = report.load_json(path)
    assert meta2["command"] == meta["command"]
    assert [(r.impl, r.status, r.runs_s) for r in loaded] == [(r.impl, r.status, r.runs_s) for r in _results()]
    assert loaded[0].shape == SHAPE


def test_csv_has_one_row_per_result(tmp_path):
    path = tmp_path / "r.csv"
    report.write_csv(path, _results())
    rows = list(csv.DictReader(path.open()))
    assert [r["impl"] for r in rows] == ["gemm-floor", "opd_fast:torch", "naive"]
    assert rows[2]["status"] == "oom" and rows[1]["median_s"] == "4.0" and "runs_s" not in rows[0]


def test_a_single_run_is_labelled_as_such():
    res = CaseResult(SHAPE, "bf16", "opd_fast:cpu", runs_s=[51.14])
    assert report.rows([res])[0][5] == "51.1 (1 run)"


@pytest.mark.parametrize(("load", "state"), [
    ({"before": {"loadavg_1m": 0.3, "cores": 2}}, "idle"),
    ({"before": {"loadavg_1m": 7.5, "cores": 2}}, "busy (load 7.5 on 2 cores)"),
    ({"label": "busy (from the run notes)"}, "busy (from the run notes)"),
    (None, "load not recorded"),
])
def test_setting_names_machine_threads_and_load(load, state):
    meta = {"cpu": "AMD EPYC", "gpu": None, "cpu_threads": 2, **({"load": load} if load else {})}
    assert report.setting(meta) == f"AMD EPYC, 2 threads, {state}"


def test_metadata_records_the_load_before_and_after():
    meta = report.metadata(BenchConfig(), argv=[], load_before={"loadavg_1m": 0.1, "cores": 2})
    assert meta["load"]["before"] == {"loadavg_1m": 0.1, "cores": 2}
    assert set(meta["load"]["after"]) == {"loadavg_1m", "cores"}
    assert report.setting(meta).endswith("idle")
