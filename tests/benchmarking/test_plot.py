import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer

from opd_fast.benchmarking import plot
from opd_fast.benchmarking.plot import RunGroup, plot_loss, plot_memory
from opd_fast.benchmarking.runner import CaseResult
from opd_fast.benchmarking.shapes import Shape
from opd_fast.plotting.palette import implementation_colour


def _case(n, v, impl, runs, dtype="fp32", floor_median=None):
    ratio = None if floor_median is None else sorted(runs)[len(runs) // 2] / floor_median
    return CaseResult(Shape(n, v, 64, 64), dtype, impl, runs_s=runs, peak_extra_mb=n * 1e-3 + 1, ratio_to_floor=ratio)


def _group(setting, ns, v=1024):
    out = []
    for n in ns:
        out += [_case(n, v, "gemm-floor", [1.0, 1.0, 1.0], floor_median=1.0),
                _case(n, v, "naive", [1.5, 2.0, 3.0], floor_median=1.0),
                _case(n, v, "opd_fast:cpu", [1.1, 1.2, 1.3], floor_median=1.0)]
    return RunGroup(setting, out)


def test_ratio_span_is_the_recorded_median_with_the_run_extremes_scaled_alike():
    r = _case(8, 64, "naive", [3.0, 4.0, 6.0], floor_median=2.0)
    assert plot._ratio(r) == (2.0, 1.5, 3.0)
    assert plot._ratio(_case(8, 64, "gemm-floor", [2.0], floor_median=2.0)) is None  # the y=1 line, not a point
    assert plot._ratio(_case(8, 64, "naive", [3.0])) is None  # no floor measured


def test_lines_never_join_points_of_different_settings():
    fig, ax = plt.subplots()
    groups = [_group("idle", [256, 512]), _group("busy", [1024, 2048])]
    plot._lines(ax, groups, "ratio", "n")
    drawn = [c.lines[0].get_xdata() for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(drawn) == 4  # naive and opd_fast:cpu, once per setting (the floor is the y=1 line)
    assert sorted(tuple(x) for x in drawn) == [(256, 512), (256, 512), (1024, 2048), (1024, 2048)]
    plt.close(fig)


@pytest.mark.parametrize("order", [["naive", "opd_fast:cpu"], ["opd_fast:cpu", "naive"]])
def test_single_shape_bars_have_fixed_colours_and_min_max_whiskers(order):
    results = [_case(512, 4096, "gemm-floor", [1.0, 1.0, 1.0], floor_median=1.0)]
    runs = {"naive": [1.5, 2.0, 3.0], "opd_fast:cpu": [1.1, 1.2, 1.3]}
    results += [_case(512, 4096, impl, runs[impl], floor_median=1.0) for impl in order]
    fig, ax = plt.subplots()
    plot._bars(ax, [RunGroup("idle", results)], "ratio")
    bars = {to_hex(p.get_facecolor()): p.get_height() for p in ax.patches}
    assert bars == {implementation_colour("naive"): 2.0, implementation_colour("opd_fast:cpu"): 1.2}
    errorbars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    whiskers = sorted(tuple(sorted(c.lines[2][0].get_segments()[0][:, 1])) for c in errorbars)
    assert whiskers == [(1.1, 1.3), (1.5, 3.0)]
    plt.close(fig)


def test_palette_is_fixed_for_known_names_and_stable_for_others():
    assert implementation_colour("opd_fast:cpu") == "#1f77b4"
    assert implementation_colour("my-peer") == implementation_colour("my-peer")
    assert len({implementation_colour(n) for n in ("trl", "trl-full-logits", "liger", "liger-eager", "naive")}) == 5


def test_plots_write_pngs_for_one_and_several_shapes(tmp_path):
    several = [_group("idle", [256, 512]), _group("busy", [256, 512], v=4096)]
    one = [RunGroup("idle", [r for r in _group("idle", [256]).results])]
    plot_loss(several, tmp_path / "lines.png", "t")
    plot_loss(one, tmp_path / "bars.png", "t")
    plot_memory(several, tmp_path / "mem.png", "t")
    for name in ("lines.png", "bars.png", "mem.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
