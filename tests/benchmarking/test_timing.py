from opd_fast.benchmarking.inputs import make_inputs
from opd_fast.benchmarking.shapes import Shape
from opd_fast.benchmarking.timing import Timing, interleaved


def test_interleaved_rotates_the_order_every_round():
    calls = []
    steps = {name: (lambda x, name=name: calls.append(name)) for name in "abc"}
    timings = interleaved(steps, make_inputs(Shape(4, 8, 4, 4), "fp32", 0), rounds=3)
    assert calls == list("abc" "bca" "cab")
    assert all(len(t.runs) == 3 and t.min <= t.median <= t.max for t in timings.values())


def test_timing_summary():
    t = Timing((3.0, 1.0, 2.0, 10.0))
    assert (t.median, t.min, t.max) == (2.5, 1.0, 10.0)
