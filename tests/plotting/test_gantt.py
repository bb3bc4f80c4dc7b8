import json

import pytest

from opd_fast.plotting.timeline import load_timeline, overlap, parse_steps, plot_timeline, select_steps
from opd_fast.runner.timeline import TIMELINE_FILE, Interval


def synthetic_timeline(steps=3) -> list[dict]:
    """Two micro-batches per step: rollout on main, scoring on a worker overlapping the next rollout."""
    rows, t = [], 0.0
    for step in range(1, steps + 1):
        rows.append({"step": step, "stage": "sample", "lane": "main", "micro_batch": None, "start": t, "end": t + 0.1})
        for mb in (0, 1):
            r0 = t + 0.1 + mb * 1.0
            rows.append({"step": step, "stage": "rollout", "lane": "main", "micro_batch": mb, "start": r0,
                         "end": r0 + 1.0})
            rows.append({"step": step, "stage": "score", "lane": "score-worker", "micro_batch": mb,
                         "start": r0 + 1.0, "end": r0 + 1.5})
        rows.append({"step": step, "stage": "learn", "lane": "main", "micro_batch": None, "start": t + 2.1,
                     "end": t + 2.6})
        rows.append({"step": step, "stage": "optim", "lane": "main", "micro_batch": None, "start": t + 2.6,
                     "end": t + 2.8})
        t += 2.8
    return rows


def _write(tmp_path, rows):
    (tmp_path / TIMELINE_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_reads_selects_and_measures_overlap(tmp_path):
    intervals = load_timeline(_write(tmp_path, synthetic_timeline()))
    assert len(intervals) == 21 and intervals[0] == Interval(1, "sample", "main", None, 0.0, 0.1)
    last = select_steps(intervals, None)
    assert {i.step for i in last} == {3}
    assert {i.step for i in select_steps(intervals, (1, 2))} == {1, 2}
    result = overlap(last)
    assert result.busy == pytest.approx({"sample": 0.1, "rollout": 2.0, "score": 1.0, "learn": 0.5, "optim": 0.2})
    assert result.wall == pytest.approx(2.8)
    assert result.efficiency == pytest.approx(3.8 / 2.8)
    assert "overlap efficiency 1.36" in result.summary()


def test_gantt_has_one_row_per_lane(tmp_path):
    path = tmp_path / "t.png"
    result = plot_timeline(select_steps(load_timeline(_write(tmp_path, synthetic_timeline())), (2, 3)), path)
    assert path.read_bytes()[:4] == b"\x89PNG" and result.wall == pytest.approx(5.6)


@pytest.mark.parametrize(("text", "want"), [("3", (3, 3)), ("2:5", (2, 5))])
def test_parse_steps(text, want):
    assert parse_steps(text) == want


@pytest.mark.parametrize(("text", "match"), [("a:b", "STEP or FIRST:LAST"), ("5:2", "first step is after")])
def test_bad_steps_are_clear_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_steps(text)


def test_steps_outside_the_record_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"no timeline intervals in steps 7..9; recorded steps are 1..3"):
        select_steps(load_timeline(_write(tmp_path, synthetic_timeline())), (7, 9))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"timeline\.jsonl not found"):
        load_timeline(tmp_path)


@pytest.mark.parametrize(("line", "match"), [
    ("{not json", r"timeline\.jsonl:2: invalid JSON"),
    ('{"step": 1, "stage": "score", "lane": "w", "start": 0.0}', "interval 2: field 'end' missing"),
    ('{"step": 1, "stage": "score", "lane": "w", "micro_batch": "x", "start": 0.0, "end": 1.0}',
     "interval 2: field 'micro_batch'"),
    ('{"step": 1, "stage": "score", "lane": "w", "start": 2.0, "end": 1.0}', "interval 2: .*ends .* before it starts"),
])
def test_malformed_rows_are_named(tmp_path, line, match):
    good = json.dumps(synthetic_timeline(1)[0])
    (tmp_path / TIMELINE_FILE).write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=match):
        load_timeline(tmp_path)
