import itertools

import pytest
import torch

from opd_fast.reference import divergence_from_logits
from opd_fast.runner.config import LossConfig, OptimConfig, RolloutConfig
from opd_fast.runner.data import Prompt
from opd_fast.runner.learn import ImportanceWeights, Learner, lr_lambda
from opd_fast.runner.models import Teacher, load_model, position_ids
from opd_fast.runner.rollout import rollout
from opd_fast.runner.score import Router, score

PROMPTS = [Prompt(0, "abc=", "a", None), Prompt(1, "a=", "b", None), Prompt(2, "hhgg fed=", "b", None),
           Prompt(3, "fa=", "a", None)]


def full_logits(lm, batch) -> torch.Tensor:
    out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=position_ids(batch.attention_mask))
    return out.logits[:, :-1][batch.target_mask]


def setup(models: dict, teacher_paths: dict[str, str], loss: LossConfig, weights: dict[str, float]):
    student = load_model(models["student"], name="student", trainable=True)
    domains = {"ta": ["a"], "tb": ["b"]}
    teachers = {n: Teacher(load_model(p, name=n), student.head.weight.shape[0], weights[n], domains[n])
                for n, p in teacher_paths.items()}
    router = Router(teachers)
    learner = Learner(student, loss, OptimConfig(lr=1e-2), teachers)
    return student, teachers, router, learner


@pytest.mark.parametrize(
    ("divergence", "beta", "temperature"), [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.3, 2.0)]
)
def test_loss_equals_reference_divergence_from_full_logits(models: dict, divergence: str, beta: float,
                                                           temperature: float) -> None:
    loss_cfg = LossConfig(divergence=divergence, beta=beta, temperature=temperature)
    weights = {"ta": 2.0, "tb": 0.5}
    student, teachers, router, learner = setup(
        models, {"ta": models["teacher_a"], "tb": models["teacher_b"]}, loss_cfg, weights
    )
    g = torch.Generator().manual_seed(0)
    micro = [rollout(student, PROMPTS[:2], RolloutConfig(max_new_tokens=7), g),
             rollout(student, PROMPTS[2:], RolloutConfig(max_new_tokens=7), g)]
    num_items = float(sum(b.num_tokens for b in micro))
    total = sum(learner.micro_step(score(b, teachers, router), num_items).loss for b in micro)
    grad = student.head.weight.grad.clone()

    student.model.zero_grad()
    expected = torch.zeros((), dtype=torch.float64)
    for b in micro:
        s_logits = full_logits(student, b)
        rows = b.target_mask.nonzero()[:, 0]
        for name, domain in (("ta", "a"), ("tb", "b")):
            keep = torch.tensor([b.prompts[int(r)].domain == domain for r in rows])
            with torch.no_grad():
                t_logits = full_logits(teachers[name].model, b)[keep]
            d = divergence_from_logits(s_logits[keep].double() / temperature, t_logits.double() / temperature,
                                       divergence, beta)
            expected = expected + weights[name] * d.sum() / num_items
    expected.backward()
    assert total == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(grad, student.head.weight.grad, atol=1e-5, rtol=1e-3)


def test_student_equal_to_teacher_gives_zero_loss(models: dict) -> None:
    student, teachers, router, learner = setup(models, {"ta": models["student"]}, LossConfig(), {"ta": 1.0})
    batch = rollout(student, [p for p in PROMPTS if p.domain == "a"], RolloutConfig(max_new_tokens=8),
                    torch.Generator().manual_seed(0))
    stats = learner.micro_step(score(batch, teachers, router), float(batch.num_tokens))
    assert abs(stats.loss) < 1e-5
    assert all(abs(d) < 1e-5 for d in stats.per_sample_divergence)


def test_non_finite_loss_skips_and_consecutive_skips_abort(models: dict) -> None:
    student, teachers, router, learner = setup(models, {"ta": models["teacher_a"]}, LossConfig(), {"ta": 1.0})
    learner.optim_cfg = OptimConfig(max_consecutive_skips=2)
    batch = rollout(student, PROMPTS[:1], RolloutConfig(max_new_tokens=4), torch.Generator().manual_seed(0))
    scored = score(batch, teachers, router)
    scored.scores[0].hidden = torch.full_like(scored.scores[0].hidden, float("nan"))
    before = student.head.weight.detach().clone()
    assert not learner.micro_step(scored, float(batch.num_tokens)).finite
    assert learner.step()["skipped"] == 1.0 and learner.skipped == 1
    assert torch.equal(before, student.head.weight)
    learner.micro_step(scored, float(batch.num_tokens))
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        learner.step()


def test_warmup_then_cosine_schedule() -> None:
    values = [lr_lambda(s, 4, 20, 0.1) for s in range(21)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and values[4] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1) and all(a >= b for a, b in itertools.pairwise(values[4:]))


def test_importance_weights_follow_each_teachers_rows(models: dict) -> None:
    """Sampled-token signal, two teachers in one micro-batch: each teacher's term is weighted by its own
    rows' importance weights (weights of 1, on the sampler's own weights, leave the loss unweighted)."""
    losses = []
    for importance in (None, ImportanceWeights(clip=10.0, temperature=1.0)):
        student, teachers, router, learner = setup(models, {"ta": models["teacher_a"], "tb": models["teacher_b"]},
                                                   LossConfig(signal="sampled"), {"ta": 1.0, "tb": 1.0})
        learner.importance = importance
        batch = rollout(student, PROMPTS, RolloutConfig(max_new_tokens=7), torch.Generator().manual_seed(0))
        scored = score(batch, teachers, router, signal="sampled")
        assert len(scored.scores) == 2
        stats = learner.micro_step(scored, float(batch.num_tokens))
        assert stats.importance_tokens in (0, batch.num_tokens)
        losses.append(stats.loss)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6)
