"""DTensor heads (FSDP2 / tensor parallel) are gathered once per call, with the gradient back on the DTensor.

On a 2-process gloo mesh with the student head sharded by rows (``Shard(0)``, what ``fully_shard``
does to a weight) and the teacher head replicated, the loss and the student gradients equal the
plain-tensor loss; the weight gradient arrives as a DTensor with the weight's placements. The same
holds for the weight of an LM head wrapped by FSDP2's ``fully_shard`` itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from group_run import device, run_group

import opd_fast

pytestmark = pytest.mark.slow  # one 2-process group run

WORLD, N, H, V = 2, 6, 8, 21


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {name: torch.randn(*shape, generator=g, dtype=torch.float64)
            for name, shape in {"h": (N, H), "w": (V, H), "b": (V,), "ht": (N, H + 2), "wt": (V, H + 2),
                                "ids": (N, V)}.items()}


def _losses(w, b, wt, t: dict[str, torch.Tensor], h) -> dict[str, torch.Tensor]:
    """One of each loss on the given heads (plain tensors or DTensors)."""
    logp, ids = t["ids"].log_softmax(-1).topk(4, -1)
    return {
        "kl": opd_fast.fused_linear_kl(h, w, t["ht"], wt, student_bias=b, divergence="jsd", backend="torch"),
        "topk": opd_fast.fused_linear_kl_topk(h, w, ids, logp, student_bias=b, backend="torch"),
        "logprobs": opd_fast.fused_linear_logprobs(h, w, ids[:, 0], bias=b, backend="torch").sum(),
    }


def _grads(use_dtensor: bool, on: torch.device | None = None) -> dict[str, dict[str, torch.Tensor]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    t = {k: v.to(on) for k, v in _inputs().items()} if on is not None else _inputs()
    results = {}
    for name in ("kl", "topk", "logprobs"):
        h = t["h"].clone().requires_grad_(True)
        w, b, wt = t["w"], t["b"], t["wt"]
        if use_dtensor:
            mesh = init_device_mesh(t["h"].device.type, (torch.distributed.get_world_size(),))
            w, b = (distribute_tensor(x, mesh, [Shard(0)]) for x in (w, b))
            wt = distribute_tensor(wt, mesh, [Replicate()])
        w, b = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
        loss = _losses(w, b, wt, t, h)[name]
        loss.backward()
        grads = {"loss": loss.detach(), "h": h.grad, "w": w.grad, "b": b.grad}
        if use_dtensor:
            assert grads["w"].placements == w.placements, grads["w"].placements
            grads = {k: g.full_tensor() if hasattr(g, "full_tensor") else g for k, g in grads.items()}
        results[name] = grads
    return results


def _fsdp2_head(on: torch.device) -> dict[str, torch.Tensor]:
    """The kl loss through the weight of a ``fully_shard`` LM head (a DTensor parameter)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    t = {k: v.to(on) for k, v in _inputs().items()}
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64, device=on)
    with torch.no_grad():
        head.weight.copy_(t["w"])
    fully_shard(head, mesh=init_device_mesh(on.type, (torch.distributed.get_world_size(),)))
    h = t["h"].clone().requires_grad_(True)
    loss = opd_fast.fused_linear_kl(h, head.weight, t["ht"], t["wt"], divergence="jsd", backend="torch")
    loss.backward()
    return {"loss": loss.detach(), "h": h.grad, "w": head.weight.grad.full_tensor()}


def _plain_kl_without_bias() -> dict[str, torch.Tensor]:
    t = _inputs()
    h, w = t["h"].clone().requires_grad_(True), t["w"].clone().requires_grad_(True)
    loss = opd_fast.fused_linear_kl(h, w, t["ht"], t["wt"], divergence="jsd", backend="torch")
    loss.backward()
    return {"loss": loss.detach(), "h": h.grad, "w": w.grad}


def _worker(rank: int, world: int) -> dict:
    return {**_grads(use_dtensor=True, on=device(rank)), "fsdp2": _fsdp2_head(device(rank))}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_group(_worker, WORLD, Path(tmp_path_factory.mktemp("dtensor")))


@pytest.mark.parametrize("loss", ["kl", "topk", "logprobs"])
def test_dtensor_head_matches_plain_head(loss: str, ranks: list[dict]) -> None:
    plain = _grads(use_dtensor=False)[loss]
    for rank, results in enumerate(ranks):
        for k, expected in plain.items():
            torch.testing.assert_close(results[loss][k], expected, msg=lambda m, k=k, r=rank: f"rank {r} {k}: {m}")


def test_fully_shard_head_matches_plain_head(ranks: list[dict]) -> None:
    plain = _plain_kl_without_bias()
    for rank, results in enumerate(ranks):
        for k, expected in plain.items():
            torch.testing.assert_close(results["fsdp2"][k], expected, msg=lambda m, k=k, r=rank: f"rank {r} {k}: {m}")
