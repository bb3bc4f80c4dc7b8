"""Forward + backward of every backend, peer and the GEMM floor under pytest-benchmark.

Each implementation is checked against the float64 reference on the same inputs before it is
timed; a missing peer is skipped with its reason. ``opd-fast bench loss`` is the fuller tool
(interleaved rounds, first call and peak memory in fresh processes, floor ratios, plots).
"""

import pytest
import torch

from opd_fast.benchmarking import correctness
from opd_fast.benchmarking.implementations import PEER_NAMES, default_backends, select
from opd_fast.benchmarking.inputs import make_inputs

DIVERGENCE, BETA, SEED = "forward_kl", 0.5, 0
CPU = torch.device("cpu")
IMPLEMENTATIONS = select(default_backends(CPU), list(PEER_NAMES), CPU)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=[i.name for i in IMPLEMENTATIONS])
def test_fwd_bwd(benchmark, impl, shape, dtype):
    if reason := impl.unavailable(DIVERGENCE):
        pytest.skip(f"{impl.name}: {reason}")
    inputs = make_inputs(shape, dtype, SEED)
    if impl.make_loss is not None:
        want = correctness.reference_outputs(inputs, DIVERGENCE, BETA)
        outcome = correctness.check(impl, inputs, dtype, DIVERGENCE, BETA, want)
        assert outcome.ok, f"{impl.name} disagrees with the reference: {outcome}"
    benchmark.group = f"{shape.label} {dtype}"
    benchmark.extra_info.update(shape=shape.as_dict(), dtype=dtype, divergence=DIVERGENCE)
    benchmark.pedantic(impl.step(DIVERGENCE, BETA), args=(inputs,), rounds=3, warmup_rounds=1, iterations=1)
