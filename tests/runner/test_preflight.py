"""A config that cannot finish fails before the first step, naming the key, role and path."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from opd_fast.runner.evaluate import evaluate_run
from opd_fast.runner.learn import Learner
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.trainer import train


def test_missing_eval_prompts_fail_before_training(make_config, tmp_path: Path) -> None:
    config = make_config(tmp_path / "run", data={"eval_prompts": ""}, eval={"at_end": True})
    with pytest.raises(ValueError, match=r"'data\.eval_prompts' must be set"):
        train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a single step was spent
    with pytest.raises(ValueError, match=r"'data\.eval_prompts': no file .*missing\.jsonl"):
        train(make_config(tmp_path / "run", data={"eval_prompts": str(tmp_path / "missing.jsonl")},
                          eval={"at_end": True}))


@pytest.mark.parametrize(("run", "loss", "match"), [
    ({"device": "bogus"}, {}, r"'run\.device' = 'bogus' is not a torch device"),
    ({"device": "cuda:7"}, {}, r"'run\.device' = 'cuda:7': this machine has \d+ CUDA"),
    ({}, {"backend": "triton"}, r"'loss\.backend' = 'triton' is unusable on cpu"),
    ({"dtype": "float16"}, {}, r"'run\.dtype' = 'float16' would compute the student's gradients in fp16"),
])
def test_device_backend_and_dtype_are_checked_up_front(make_config, tmp_path: Path, run: dict, loss: dict,
                                                      match: str, monkeypatch) -> None:
    if run.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter would make Triton usable on CPU tensors
    with pytest.raises(ValueError, match=match):
        train(make_config(tmp_path / "run", run=run, loss=loss))
    assert not (tmp_path / "run").exists()


def test_unknown_backend_is_a_config_error(make_config, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'loss\.backend' must be one of"):
        make_config(tmp_path, loss={"backend": "fastest"})


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_model_dir_without_tokenizer_names_role_and_path(make_config, models: dict, tmp_path: Path,
                                                        role: str) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(models["student"], bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name in ("vocab.json", "chat_template.jinja"):
            f.unlink()
    def section(path: Path) -> dict:
        return {"student": {"path": str(path)}} if role == "student" else {"teachers": {"tb": {"path": str(path)}}}

    key, named = ("student.path", "student") if role == "student" else ("teachers.tb.path", "teacher 'tb'")
    with pytest.raises(ValueError, match=rf"'{key}': the {named} model directory {bare} has no tokenizer files"):
        train(make_config(tmp_path / "run", **section(bare)))
    with pytest.raises(ValueError, match=rf"'{key}' \({named}\): no such local directory .*nowhere$"):
        train(make_config(tmp_path / "run", **section(tmp_path / "nowhere")))


@pytest.mark.parametrize("split", ["prompts", "eval_prompts"])
def test_prompts_beyond_the_models_positions_fail_at_start(make_config, prompts_file: str, tmp_path: Path,
                                                          split: str) -> None:
    long = tmp_path / "long.jsonl"
    long.write_text(Path(prompts_file).read_text() + json.dumps({"prompt": "ab" * 130 + "=", "domain": "a"}) + "\n")
    # BOS + 261 characters + rollout.max_new_tokens (6) = 268 positions; the tiny models have 256
    config = make_config(tmp_path / "run", data={split: str(long)}, eval={"at_end": True, "num_prompts": 100})
    with pytest.raises(ValueError, match=rf"a prompt of data\.{split} .* needs 268 positions .* more than the 256"):
        train(config)
    assert read_metrics(tmp_path / "run") == []


def test_weights_are_checked_after_the_first_step(make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = Learner.step

    def breaking_step(self: Learner) -> dict:
        out = real_step(self)
        with torch.no_grad():
            self.params[0].view(-1)[0] = float("nan")  # what pure-fp16 AdamW did to the student
        return out

    monkeypatch.setattr(Learner, "step", breaking_step)
    with pytest.raises(RuntimeError, match=r"parameter '.*' is non-finite after step 1"):
        train(make_config(tmp_path / "run", optim={"steps": 3}, checkpoint={"every": 0}))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == []  # stopped before logging a broken step


def test_eval_names_a_teacher_dir_without_tokenizer(make_config, models: dict, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(models["teacher_a"], bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ValueError, match=rf"'teachers\.ta\.path': the teacher 'ta' model directory {bare} has no"):
        evaluate_run(make_config(tmp_path / "run", teachers={"ta": {"path": str(bare), "domains": ["a"]}}))
