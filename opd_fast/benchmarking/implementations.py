"""What ``opd-fast bench`` can time: opd-fast backends, peers and the GEMM floor, by name.

Every implementation exposes the same ``step(inputs)`` (one forward + backward) so the timing,
memory and correctness code never special-cases one. Availability is probed, never assumed: a
peer that is not installed or an opd-fast backend not built here is reported, not fatal.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import available_backends, fused_linear_kl
from ..core.call import DIVERGENCES
from . import peers
from .floor import gemm_floor_step
from .inputs import TEMPERATURE, BenchInputs

Step = Callable[[BenchInputs], None]
FLOOR = "gemm-floor"
PEER_NAMES = ("naive", "trl", "trl-full-logits", "liger", "liger-eager")


@dataclass(frozen=True)
class Implementation:
    """One contender. ``make_loss(divergence, beta)`` is None only for the GEMM floor.

    ``logit_bytes(itemsize)``: bytes per ``N x V`` element it materializes at peak (None when it
    never holds a full logits matrix); used to skip cases that cannot fit and say what they need.
    ``compiles``: its first call in a process compiles, so it always gets a warm-up round.
    """

    name: str
    description: str
    make_loss: Callable[[str, float], peers.LossFn] | None
    divergences: tuple[str, ...] = DIVERGENCES
    probe: Callable[[], str] = lambda: ""
    logit_bytes: Callable[[int], float] | None = None
    compiles: bool = False

    def unavailable(self, divergence: str) -> str:
        """Why this cannot run ``divergence`` here ("" when it can)."""
        if divergence not in self.divergences:
            return f"does not implement divergence={divergence!r}"
        return self.probe()

    def step(self, divergence: str, beta: float) -> Step:
        """One forward + backward over the inputs (grads of the student leaves cleared first)."""
        if self.make_loss is None:
            return gemm_floor_step
        loss_fn = self.make_loss(divergence, beta)

        def run(x: BenchInputs) -> None:
            x.clear_grads()
            loss_fn(x.hs, x.ws, x.ht, x.wt).backward()

        return run


@functools.cache
def _import_probe(module: str, attr: str | None = None) -> str:
    try:
        mod = importlib.import_module(module)
        if attr:
            getattr(mod, attr)
    except Exception as exc:  # any import failure means "peer not usable here", with the reason
        return f"not installed or not importable ({type(exc).__name__}: {exc})"
    return ""


@functools.cache
def _trl_probe(finder: Callable[[], object]) -> str:
    try:
        finder()
    except ImportError as exc:
        return f"not installed or not importable ({exc})"
    return ""


def _opd_backend(name: str, device: torch.device) -> Implementation:
    def make(divergence: str, beta: float) -> peers.LossFn:
        def loss(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
            return fused_linear_kl(
                hs, ws, ht, wt, divergence=divergence, beta=beta, temperature=TEMPERATURE, backend=name
            )

        return loss

    reason = _timing_refusal(name, device)
    return Implementation(f"opd_fast:{name}", f"opd-fast fused loss, backend={name!r}", make, probe=lambda: reason)


def _peer(name: str) -> Implementation:
    liger_probe = functools.partial(_import_probe, "liger_kernel.chunked_loss", "LigerFusedLinearJSDLoss")
    peer_divs = ("forward_kl", "reverse_kl", "jsd")
    table = {
        "naive": Implementation(
            "naive", "full logits + fp32 log_softmax + F.kl_div", peers.naive_loss,
            divergences=("forward_kl", "reverse_kl"), logit_bytes=lambda item: 2 * item + 4 * 4,
        ),
        "trl": Implementation(
            "trl", "TRL DistillationTrainer's chunked hidden-state divergence", peers.trl_chunked_loss,
            divergences=peer_divs, probe=functools.partial(_trl_probe, peers.trl_chunked_divergence),
        ),
        "trl-full-logits": Implementation(
            "trl-full-logits", "TRL GKDTrainer.generalized_jsd_loss on full logits", peers.trl_loss,
            divergences=peer_divs, probe=functools.partial(_trl_probe, peers.trl_generalized_jsd),
            logit_bytes=lambda item: 8 * item,
        ),
        "liger": Implementation(
            "liger", "Liger LigerFusedLinearJSDLoss, compiled=True",
            functools.partial(peers.liger_loss, compiled=True), divergences=peer_divs, probe=liger_probe,
            compiles=True,
        ),
        "liger-eager": Implementation(
            "liger-eager", "Liger LigerFusedLinearJSDLoss, compiled=False",
            functools.partial(peers.liger_loss, compiled=False), divergences=peer_divs, probe=liger_probe,
        ),
    }
    if name not in table:
        raise ValueError(f"peers must be a subset of {PEER_NAMES}, got {name!r}")
    return table[name]


def floor_implementation() -> Implementation:
    return Implementation(FLOOR, "bare GEMMs: student + teacher logits, grad-hidden, grad-weight", None)


def _timing_refusal(name: str, device: torch.device) -> str:
    """Why backend ``name`` cannot be timed on ``device`` ("" when it can)."""
    if name == "triton" and device.type != "cuda":  # TRITON_INTERPRET=1 runs it, for numerics only
        return f"Triton kernels need CUDA tensors to be timed (on {device} they can only be interpreted)"
    return available_backends(device).get(name, f"unknown opd-fast backend {name!r}")


def default_backends(device: torch.device) -> list[str]:
    """Every opd-fast backend timeable on ``device`` (the float64 reference is a spec, not a contender)."""
    return [name for name in available_backends(device) if name != "reference" and not _timing_refusal(name, device)]


def select(backends: list[str], peer_names: list[str], device: torch.device) -> list[Implementation]:
    """The floor first, then the chosen opd-fast backends, then the chosen peers."""
    return [floor_implementation(), *(_opd_backend(b, device) for b in backends), *(_peer(p) for p in peer_names)]


def by_name(name: str, device: torch.device) -> Implementation:
    """Look one implementation up by its reported name (used by the subprocess worker)."""
    if name == FLOOR:
        return floor_implementation()
    if name.startswith("opd_fast:"):
        return _opd_backend(name.split(":", 1)[1], device)
    return _peer(name)
