import torch

from opd_fast.benchmarking import runner
from opd_fast.benchmarking.implementations import by_name, select
from opd_fast.benchmarking.memory import MB, PeakMeter, estimate_bytes, fit_problem
from opd_fast.benchmarking.runner import BenchConfig, _precheck
from opd_fast.benchmarking.shapes import Shape

CPU = torch.device("cpu")


def test_peak_meter_sees_a_transient_allocation():
    meter = PeakMeter(CPU)
    meter.start()
    buf = torch.ones(48 * MB // 4)  # 48 MB, touched, then freed
    del buf
    assert 40 * MB < meter.extra_bytes() < 200 * MB


def test_estimates_scale_with_n_times_v_and_chunked_ones_have_none():
    naive = by_name("naive", CPU)
    small, big = estimate_bytes(naive, Shape(2, 8, 4, 4), "fp32"), estimate_bytes(naive, Shape(4, 16, 4, 4), "fp32")
    assert big == 4 * small and small > 0
    assert estimate_bytes(naive, Shape(2, 8, 4, 4), "bf16") < small
    assert estimate_bytes(by_name("opd_fast:torch", CPU), Shape(2, 8, 4, 4), "fp32") is None


def test_a_case_that_cannot_fit_is_reported_oom_with_what_it_needs(monkeypatch):
    monkeypatch.setattr(runner, "available_bytes", lambda device: 1 * 2**30)
    shape = Shape(16384, 152064, 1024, 1024)
    results = {r.impl: r for r in _precheck(select(["torch"], ["naive", "trl", "trl-full-logits"], CPU), shape, "fp32",
                                                BenchConfig())}
    assert results["naive"].status == "oom" and "would need ~" in results["naive"].reason
    assert results["trl-full-logits"].status == "oom"
    assert results["naive"].estimated_mb > 10_000
    assert results["opd_fast:torch"].status == "ok"
    assert fit_problem(None, 1) == "" and fit_problem(10, None) == ""
