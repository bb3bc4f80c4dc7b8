"""The TRL integration gives TRL's own loss values and gradients on the same batch."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("trl.experimental.gkd")

from datasets import Dataset  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402
from trl.trainer import distillation_trainer  # noqa: E402

from opd_fast.integrations import trl as opd_trl  # noqa: E402

N, H_S, H_T, V = 11, 8, 12, 29


def _heads(bias: bool) -> dict:
    g = torch.Generator().manual_seed(5)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    mask = torch.ones(3, N, dtype=torch.long)
    mask[0, 8:] = 0
    return {"student_hidden_states": rand(3, N, H_S), "teacher_hidden_states": rand(3, N, H_T),
            "student_lm_head_weight": rand(V, H_S), "teacher_lm_head_weight": rand(V, H_T), "completion_mask": mask,
            "student_lm_head_bias": rand(V) if bias else None, "teacher_lm_head_bias": rand(V) if bias else None}


def _run(fn, tensors: dict, **options) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    leaves = {k: v.clone().requires_grad_(k.startswith("student")) if v is not None else None
              for k, v in tensors.items()}
    loss, entropy, n_valid = fn(**leaves, **options)
    loss.backward()
    grads = [leaves[k].grad for k in ("student_hidden_states", "student_lm_head_weight", "student_lm_head_bias")
             if leaves[k] is not None]
    return [loss.detach(), entropy.detach(), n_valid], grads


@pytest.mark.parametrize(("beta", "temperature", "num_items", "bias", "softcap"), [
    (0.0, 1.0, None, False, None), (0.5, 2.0, None, True, None), (1.0, 1.0, 7, False, 5.0),
    (0.3, 0.7, torch.tensor(20.0), True, 3.0),
])
def test_chunked_divergence_loss_is_trls(beta, temperature, num_items, bias, softcap) -> None:
    tensors = _heads(bias)
    options = dict(beta=beta, temperature=temperature, num_items_in_batch=num_items,
                   student_final_logit_softcapping=softcap, teacher_logit_scale=1.3)
    ours, our_grads = _run(opd_trl.chunked_divergence_loss, tensors, **options)
    theirs, their_grads = _run(distillation_trainer._chunked_divergence_loss, tensors, **options)
    for got, want in zip([*ours, *our_grads], [*theirs, *their_grads], strict=True):
        torch.testing.assert_close(got.float(), want.float())  # TRL computes in fp32


@pytest.fixture(scope="module")
def trainers(models, tokenizer, tmp_path_factory):
    student, teacher = models
    out = str(tmp_path_factory.mktemp("trl"))
    common = dict(output_dir=out, report_to=[], per_device_train_batch_size=2, max_steps=1, use_cpu=True,
                  activation_checkpointing=False)
    gkd = GKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(**common), processing_class=tokenizer,
                     train_dataset=Dataset.from_list([{"messages": [{"role": "user", "content": "ab"}]}] * 2))
    dist = trl.DistillationTrainer(model=student, teacher_model=teacher, args=trl.DistillationConfig(**common),
                                   processing_class=tokenizer,
                                   train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "a"}]}]))
    return {"gkd": gkd, "distillation": dist}


def _loss_and_grads(model, compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _trainer_loss(kind: str, trainer, batch, num_items):
    if kind == "gkd":
        return lambda: trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    split = 3
    inputs = {"prompt_ids": batch["input_ids"][:, :split], "prompt_mask": batch["attention_mask"][:, :split],
              "completion_ids": batch["input_ids"][:, split:], "completion_mask": batch["attention_mask"][:, split:]}
    return lambda: trainer._compute_loss(trainer.model, inputs, num_items)[0]


@pytest.mark.parametrize("kind", ["gkd", "distillation"])
@pytest.mark.parametrize("num_items", [None, 9])
def test_use_opd_fast_keeps_the_trainers_loss(kind, num_items, trainers, batch, monkeypatch) -> None:
    trainer = trainers[kind]
    theirs = _loss_and_grads(trainer.model, _trainer_loss(kind, trainer, batch, num_items))
    calls = []
    spy = opd_trl.distillation_loss if kind == "gkd" else opd_trl.chunked_divergence_loss
    monkeypatch.setattr(opd_trl, spy.__name__, lambda *a, **k: calls.append(1) or spy(*a, **k))
    patched = opd_trl.use_opd_fast(trainer)
    assert patched is trainer
    try:
        ours = _loss_and_grads(trainer.model, _trainer_loss(kind, trainer, batch, num_items))
    finally:  # the fixture's trainers are shared: drop the instance-level override
        vars(trainer).pop("compute_loss" if kind == "gkd" else "_compute_loss")
    assert calls, "the trainer did not go through opd-fast"
    assert distillation_trainer._chunked_divergence_loss is not opd_trl.chunked_divergence_loss
    torch.testing.assert_close(ours[0], theirs[0].to(ours[0].dtype))
    for got, want in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(got, want)


def test_other_trainers_are_refused() -> None:
    with pytest.raises(TypeError, match="DistillationTrainer or GKDTrainer, got object"):
        opd_trl.use_opd_fast(object())
