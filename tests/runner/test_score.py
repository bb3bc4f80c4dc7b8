import dataclasses
import warnings

import pytest
import torch

from opd_fast.runner.config import RolloutConfig, TeacherConfig
from opd_fast.runner.data import Prompt, encode_prompt
from opd_fast.runner.models import Teacher, check_compatible, forward_hidden, load_model
from opd_fast.runner.rollout import rollout
from opd_fast.runner.score import Router, score


def load_teacher(path: str, name: str, domains: tuple[str, ...] | list[str] = ()) -> Teacher:
    model = load_model(path, name=name)
    return Teacher(model, model.head.weight.shape[0], domains=list(domains))


def test_router_rules() -> None:
    router = Router({"ta": TeacherConfig(path="x", domains=["a"]), "rest": TeacherConfig(path="y")})
    assert router.route(["a", "z", "a", "q"]) == {"ta": [0, 2], "rest": [1, 3]}
    with pytest.raises(ValueError, match="domain 'z' has no teacher"):
        Router({"ta": TeacherConfig(path="x", domains=["a"])}).check(["a", "z"])
    with pytest.raises(ValueError, match="routed to two teachers"):
        Router({"t1": TeacherConfig(path="x", domains=["a"]), "t2": TeacherConfig(path="y", domains=["a"])})


def test_each_domain_is_scored_by_its_teacher(models: dict) -> None:
    student = load_model(models["student"])
    teachers = {"ta": load_teacher(models["teacher_a"], "ta", ["a"]),
                "tb": load_teacher(models["teacher_b"], "tb", ["b"])}
    router = Router(teachers)
    prompts = [Prompt(i, p, d, None) for i, (p, d) in enumerate([("ab=", "b"), ("abc=", "a"), ("h=", "b")])]
    batch = rollout(student, prompts, RolloutConfig(max_new_tokens=5), torch.Generator().manual_seed(0))
    scored = score(batch, teachers, router)
    assert {s.teacher: s.rows.tolist() for s in scored.scores} == {"tb": [0, 2], "ta": [1]}
    for s in scored.scores:
        teacher = teachers[s.teacher].model
        assert s.head.weight is teacher.head.weight  # the routed teacher's own head
        with torch.no_grad():  # the routed teacher's states, each row alone (no padding interplay)
            expect = []
            for r in s.rows.tolist():
                keep = batch.attention_mask[r].bool()
                ids, mask = batch.input_ids[r][keep][None], batch.attention_mask[r][keep][None]
                hidden, _ = forward_hidden(teacher, ids, mask)
                expect.append(hidden[0, :-1][batch.completion_mask[r][keep][1:]])
        torch.testing.assert_close(s.hidden, torch.cat(expect), atol=1e-4, rtol=1e-4)
        assert s.hidden.shape[-1] == 48  # teacher width, not the student's 32


def test_topk_and_sampled_signals(models: dict) -> None:
    student = load_model(models["student"])
    teachers = {"ta": load_teacher(models["teacher_a"], "ta")}
    router = Router(teachers)
    batch = rollout(student, [Prompt(0, "ab=", "a", None)], RolloutConfig(max_new_tokens=5),
                    torch.Generator().manual_seed(0))
    full = score(batch, teachers, router).scores[0]
    logp = torch.log_softmax(full.hidden @ full.head.weight.T, -1)
    top = score(batch, teachers, router, signal="topk", topk=3).scores[0]
    torch.testing.assert_close(top.topk_logprobs, logp.topk(3).values)
    sampled = score(batch, teachers, router, signal="sampled").scores[0]
    torch.testing.assert_close(sampled.token_logprobs, logp.gather(-1, batch.targets[:, None]).squeeze(-1))


def test_tokenizer_mismatch_names_the_tokens(models: dict) -> None:
    student = load_model(models["student"])
    other = load_model(models["other_tok"], name="odd")
    with pytest.raises(ValueError, match=r"tokenizer mismatch.*'odd'.*first differences: 'a': \d+ vs \d+"):
        check_compatible(student, other)
    assert check_compatible(student, load_model(models["teacher_a"], name="ta")) == student.head.weight.shape[0]


def test_chat_templates_render_prompts_and_differences_warn(models: dict) -> None:
    student, teacher = load_model(models["student"]), load_model(models["teacher_a"], name="ta")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    student.tokenizer.chat_template = teacher.tokenizer.chat_template = template
    assert encode_prompt(student.tokenizer, "ab", chat_template=True) == student.tokenizer("ab=")["input_ids"]
    with warnings.catch_warnings():  # same segmentation (llama and qwen2 dirs alike) and rendering: silent
        warnings.simplefilter("error")
        check_compatible(student, teacher, chat_template=True)
    teacher.tokenizer.chat_template = template.replace("=", " =")
    with pytest.warns(UserWarning, match="chat templates of student and teacher 'ta' render differently"):
        check_compatible(student, teacher, chat_template=True)


@pytest.mark.parametrize("signal", ["hidden", "topk", "sampled"])
def test_a_grouped_batch_scores_like_the_whole_batch(models: dict, signal: str) -> None:
    student = load_model(models["student"])
    teachers = {"ta": load_teacher(models["teacher_a"], "ta", ["a"]),
                "tb": load_teacher(models["teacher_b"], "tb", ["b"])}
    router = Router(teachers)
    prompts = [Prompt(i, f"{w}=", "ab"[i % 2], None) for i, w in enumerate(["abc", "bad", "cafe", "dead", "face", "h"])]
    cfg = RolloutConfig(max_new_tokens=12)
    batch = rollout(student, prompts, cfg, torch.Generator().manual_seed(0), handoff=0.25)
    assert len(batch.groups) >= 2
    whole = dataclasses.replace(batch, groups=[])
    kwargs = {"signal": signal, "topk": 3}
    grouped, plain = score(batch, teachers, router, **kwargs), score(whole, teachers, router, **kwargs)
    attr = {"hidden": "hidden", "topk": "topk_logprobs", "sampled": "token_logprobs"}[signal]
    for name in teachers:  # per teacher and row, the same signal, only split differently
        def by_row(scored, name=name):
            out = {}
            for ts in (t for t in scored.scores if t.teacher == name):
                counts = batch.target_mask[ts.rows].sum(1).tolist()
                out.update(zip(ts.rows.tolist(), torch.split(getattr(ts, attr), counts), strict=True))
            return out
        got, want = by_row(grouped), by_row(plain)
        assert sorted(got) == sorted(want) and got
        for r in want:
            torch.testing.assert_close(got[r], want[r], atol=1e-4, rtol=1e-4)
