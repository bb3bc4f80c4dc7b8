import dataclasses

import pytest

from opd_fast.runner.config import RolloutConfig
from opd_fast.runner.data import Prompt
from opd_fast.runner.evaluate import Verifiers, evaluate
from opd_fast.runner.models import Teacher, load_model
from opd_fast.runner.rollout import rollout
from opd_fast.runner.score import Router
from opd_fast.tasks import Example


def test_verifiers_resolve_module_functions_and_name_bad_specs() -> None:
    v = Verifiers({"d": "opd_fast.runner.evaluate:exact_match"})
    assert v("d", "p", " ab ", "ab") == 1.0 and v("other", "p", "ab", "ba") == 0.0
    with pytest.raises(ValueError, match=r"loss\.verifiers\.d.*no_such_module"):
        Verifiers({"d": "no_such_module:f"})


def test_accuracy_per_domain_and_zero_kl_against_itself(models: dict) -> None:
    student = load_model(models["student"])
    cfg = RolloutConfig(max_new_tokens=5, micro_batch_size=2)
    prompts = [Prompt(0, "ab=", "a", None), Prompt(1, "ba=", "b", None), Prompt(2, "h=", "b", None)]
    greedy = rollout(student, prompts, dataclasses.replace(cfg, temperature=0.0))
    # domain a's reference is what greedy decoding produces; b's references are wrong
    examples = [Example("ab=", greedy.completions[0], "a"), Example("ba=", "zzz", "b"), Example("h=", "zzz", "b")]
    teachers = {"self": Teacher(load_model(models["student"], name="self"), student.head.weight.shape[0])}
    result = evaluate(student, teachers, Router(teachers), examples, cfg, Verifiers({}))
    assert result["greedy/accuracy/a"] == 1.0 and result["greedy/accuracy/b"] == 0.0
    assert result["greedy/accuracy"] == pytest.approx(1 / 3)
    assert "sampled/accuracy" in result and abs(result["reverse_kl"]) < 1e-5
