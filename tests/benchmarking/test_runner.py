import dataclasses

import torch

from opd_fast.benchmarking import runner, worker
from opd_fast.benchmarking.implementations import by_name, select
from opd_fast.benchmarking.peers import naive_loss
from opd_fast.benchmarking.runner import BenchConfig, run_loss_bench
from opd_fast.benchmarking.shapes import Shape

CPU = torch.device("cpu")


def test_a_wrong_loss_is_reported_incorrect_and_never_timed(monkeypatch):
    monkeypatch.setattr(runner, "run_in_subprocess", lambda spec, timeout=None: worker.measure(spec))
    wrong = dataclasses.replace(by_name("naive", CPU), name="naive",
                                make_loss=lambda div, beta: naive_loss("reverse_kl", beta))
    impls = [*select(["torch"], [], CPU), wrong]
    seen = []
    results = run_loss_bench(impls, [Shape(32, 256, 16, 16), Shape(48, 256, 16, 16)], ["fp32"],
                             BenchConfig(repeats=2), log=lambda msg: None,
                             on_case=lambda so_far: seen.append(len(so_far)))
    assert seen == [3, 6]  # results handed over after every case (a stopped run keeps them)
    for res in results:
        if res.impl == "naive":
            assert res.status == "incorrect" and "relative error" in res.reason
            assert res.runs_s == [] and res.first_call_s is None
        else:
            assert res.status == "ok" and len(res.runs_s) == 2 and res.ratio_to_floor > 0
