import sys

import pytest
import torch

from opd_fast.benchmarking import implementations
from opd_fast.benchmarking.implementations import FLOOR, by_name, select
from opd_fast.benchmarking.inputs import make_inputs
from opd_fast.benchmarking.runner import BenchConfig, _precheck
from opd_fast.benchmarking.shapes import Shape

CPU = torch.device("cpu")


def test_selection_has_the_floor_first_and_names_round_trip():
    impls = select(["torch"], ["naive", "liger-eager"], CPU)
    assert [i.name for i in impls] == [FLOOR, "opd_fast:torch", "naive", "liger-eager"]
    assert all(by_name(i.name, CPU).name == i.name for i in impls)
    with pytest.raises(ValueError, match="peers must be a subset"):
        select([], ["cce"], CPU)


def test_missing_peer_is_reported_skipped_not_failed(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)  # import now raises ImportError
    implementations._import_probe.cache_clear()
    try:
        results = _precheck(select([], ["liger", "naive"], CPU), Shape(8, 64, 8, 8), "fp32", BenchConfig())
    finally:
        implementations._import_probe.cache_clear()
    status = {r.impl: (r.status, r.reason) for r in results}
    assert status["liger"][0] == "skipped" and "not installed" in status["liger"][1]
    assert status["naive"] == ("ok", "") and status[FLOOR] == ("ok", "")


def test_unsupported_divergence_and_unbuilt_backend_are_skipped():
    results = _precheck(select(["triton"], ["naive", "trl", "trl-full-logits"], CPU), Shape(8, 64, 8, 8), "fp32",
                        BenchConfig(divergence="tvd"))
    status = {r.impl: r for r in results}
    assert status["opd_fast:triton"].status == "skipped" and "CUDA" in status["opd_fast:triton"].reason
    assert status["naive"].status == status["trl"].status == status["trl-full-logits"].status == "skipped"
    assert "tvd" in status["trl"].reason and "tvd" in status["trl-full-logits"].reason


def test_steps_produce_student_gradients_and_the_floor_runs():
    x = make_inputs(Shape(16, 128, 8, 8), "fp32", seed=0)
    by_name("naive", CPU).step("forward_kl", 0.5)(x)
    assert x.hs.grad is not None and x.ws.grad.abs().sum() > 0
    by_name(FLOOR, CPU).step("forward_kl", 0.5)(x)  # GEMMs only, leaves untouched
