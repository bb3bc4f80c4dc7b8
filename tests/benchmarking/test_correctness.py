import dataclasses

import pytest
import torch

from opd_fast.benchmarking import correctness
from opd_fast.benchmarking.implementations import by_name, default_backends
from opd_fast.benchmarking.inputs import make_inputs
from opd_fast.benchmarking.peers import naive_loss
from opd_fast.benchmarking.shapes import Shape

SHAPE = Shape(48, 640, 32, 40)


def _usable(names):
    cpu = torch.device("cpu")
    return [n for n in names if not by_name(n, cpu).unavailable("forward_kl")]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_every_usable_peer_and_backend_matches_the_reference(divergence):
    """Beta convention and reduction of each peer agree with ours before anything is timed."""
    cpu = torch.device("cpu")
    peers = _usable(["naive", "trl", "trl-full-logits", "liger-eager"])
    names = [f"opd_fast:{b}" for b in default_backends(cpu)] + peers
    x = make_inputs(SHAPE, "fp32", seed=1)
    want = correctness.reference_outputs(x, divergence, beta=0.3)
    checked = 0
    for name in names:
        impl = by_name(name, cpu)
        if impl.unavailable(divergence):
            continue
        result = correctness.check(impl, x, "fp32", divergence, 0.3, want)
        assert result.ok, (name, divergence, result)
        assert result.max_rel_err < 1e-4
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("peer", ["trl", "trl-full-logits"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_trl_peers_match_the_reference_values_and_gradients(peer, divergence):
    """Both TRL losses, where TRL is installed: same beta convention, mean over tokens, same gradients."""
    pytest.importorskip("trl")
    cpu = torch.device("cpu")
    impl = by_name(peer, cpu)
    assert impl.unavailable(divergence) == ""
    x = make_inputs(SHAPE, "fp32", seed=4)
    result = correctness.check(impl, x, "fp32", divergence, 0.3, correctness.reference_outputs(x, divergence, 0.3))
    assert result.max_rel_err < 1e-4, result


def test_a_wrong_convention_fails_the_check():
    """Reverse KL passed off as forward KL is caught: the check is not vacuous."""
    cpu = torch.device("cpu")
    swapped = dataclasses.replace(by_name("naive", cpu), make_loss=lambda div, beta: naive_loss("reverse_kl", beta))
    x = make_inputs(SHAPE, "fp32", seed=1)
    want = correctness.reference_outputs(x, "forward_kl", 0.5)
    result = correctness.check(swapped, x, "fp32", "forward_kl", 0.5, want)
    assert not result.ok and result.max_rel_err > 1e-2


def test_bf16_is_checked_with_its_own_tolerance():
    cpu = torch.device("cpu")
    x = make_inputs(SHAPE, "bf16", seed=2)
    result = correctness.check(by_name("opd_fast:torch", cpu), x, "bf16", "forward_kl", 0.5,
                               correctness.reference_outputs(x, "forward_kl", 0.5))
    assert result.ok and result.tolerance == correctness.TOLERANCE["bf16"]
