from opd_fast.benchmarking.plot import plot_loss, plot_memory
from opd_fast.benchmarking.runner import CaseResult
from opd_fast.benchmarking.shapes import Shape


def test_plots_write_pngs(tmp_path):
    results = [
        CaseResult(Shape(n, v, 64, 64), dtype, impl, runs_s=[n * v * 1e-9],
                   peak_extra_mb=n * 1e-3 if impl == "naive" else 5)
        for n in (256, 512) for v in (1024, 4096) for dtype in ("fp32", "bf16") for impl in ("naive", "opd_fast:torch")
    ]
    plot_loss(results, tmp_path / "loss.png", "t")
    plot_memory(results, tmp_path / "mem.png", "t")
    for name in ("loss.png", "mem.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
