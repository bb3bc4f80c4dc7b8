from opd_fast.benchmarking.memory import MB
from opd_fast.benchmarking.shapes import Shape
from opd_fast.benchmarking.worker import WorkerSpec, run_in_subprocess


def test_worker_measures_first_call_and_peak_in_a_fresh_process():
    """Naive holds several fp32 N x V buffers: its measured extra peak must show them."""
    shape = Shape(256, 8192, 16, 16)
    out = run_in_subprocess(WorkerSpec("naive", shape, "fp32", 0, "forward_kl", 0.5, "cpu"), timeout=300)
    assert out["status"] == "ok", out
    assert out["first_call_s"] > 0
    logits_mb = shape.n * shape.v * 4 / MB  # 8 MB
    assert 2 * logits_mb < out["peak_extra_bytes"] / MB < 40 * logits_mb


def test_worker_failure_comes_back_as_a_status():
    out = run_in_subprocess(WorkerSpec("no-such-peer", Shape(4, 8, 4, 4), "fp32", 0, "forward_kl", 0.5, "cpu"))
    assert out["status"] == "error" and "peers must be a subset" in out["reason"]
