import contextlib
import os
import signal
from pathlib import Path

import pytest
import torch

from opd_fast.plotting.dashboard import plot_run
from opd_fast.runner import checkpoint as ckpt_mod
from opd_fast.runner.checkpoint import latest_checkpoint
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.trainer import Trainer, train
from opd_fast.tasks import Example, register_task


def step_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("kind") != "eval"]


def test_end_to_end_metrics_checkpoints_eval_and_plots(make_config, models: dict, tmp_path: Path) -> None:
    config = make_config(tmp_path / "run", checkpoint={"every": 1, "keep": 2},
                         eval={"at_end": True, "num_prompts": 4})
    summary = train(config)
    assert summary["steps"] == 3 and not summary["interrupted"] and summary["tokens_per_s"] > 0
    rows = step_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "divergence/teacher/ta", "divergence/domain/b", "student_entropy", "completion_len",
                "truncation_rate", "tokens_per_s", "time/rollout", "time/score", "time/learn", "grad_norm", "lr",
                "skipped_steps"):
        assert key in rows[0] or key in rows[1] or key in rows[2], key
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000003"]  # keep = 2
    assert (tmp_path / "run/checkpoints/step-00000003/student/model.safetensors").is_file()
    for key in ("greedy/accuracy", "sampled/accuracy", "greedy/accuracy/a", "reverse_kl", "reverse_kl/b"):
        assert key in summary["eval"], key
    assert summary["eval"]["reverse_kl"] >= 0
    plots = {p.name for p in plot_run(tmp_path / "run", each=True)}
    assert plots >= {"dashboard.png", "loss.png", "eval_reverse_kl.png"}


def test_resume_continues_exactly(make_config, models: dict, tmp_path: Path) -> None:
    opts = {"optim": {"steps": 4, "lr": 1e-2, "warmup_steps": 1}, "loss": {"off_policy_fraction": 0.5}}
    train(make_config(tmp_path / "full", **opts))
    train(make_config(tmp_path / "split", **opts), stop_after=2)
    assert [r["step"] for r in step_rows(tmp_path / "split")] == [1, 2]
    summary = train(make_config(tmp_path / "split", **opts), resume=True)
    assert summary["steps_run"] == 2
    full, split = step_rows(tmp_path / "full"), step_rows(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(full, split, strict=True):
        assert (a["loss"], a["tokens"], a["lr"], a["source"]) == (b["loss"], b["tokens"], b["lr"], b["source"])


def test_interrupted_checkpoint_write_keeps_the_previous_one(make_config, models: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path / "run", checkpoint={"every": 1, "keep": 3})
    real_rename = ckpt_mod._rename

    def killed_at_step_3(src: Path, dst: Path) -> None:
        if dst.name.endswith("3"):
            raise KeyboardInterrupt("killed between write and rename")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt_mod, "_rename", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    root = tmp_path / "run" / "checkpoints"
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # the half-written step 3
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # cleaned up
    monkeypatch.setattr(ckpt_mod, "_rename", real_rename)
    summary = train(config, resume=True)
    assert summary["steps"] == 3 and summary["steps_run"] == 1


@pytest.mark.parametrize("run", [{}, {"max_staleness": 1}], ids=["strict", "async"])
def test_sigterm_checkpoints_and_exits_cleanly(make_config, models: dict, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, run: dict) -> None:
    real_step = Trainer.train_step

    def step_then_sigterm(self: Trainer) -> dict:
        row = real_step(self)
        os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    summary = train(make_config(tmp_path / "run", run=run))
    assert summary["interrupted"] and summary["steps"] == 1
    assert latest_checkpoint(tmp_path / "run").name == "step-00000001"


@pytest.mark.parametrize(("fraction", "source"),
                         [(0.0, {"student"}), (1.0, {"dataset"}), (0.5, {"student", "dataset"})])
def test_off_policy_fraction_mixes_off_policy_batches(make_config, models: dict, tmp_path: Path, fraction: float,
                                                      source: set) -> None:
    config = make_config(tmp_path, loss={"off_policy_fraction": fraction}, optim={"steps": 8})
    trainer = Trainer(config)
    trainer.learner.step = lambda: {"grad_norm": 0.0, "lr": 0.0, "skipped": 0.0}  # only the data path matters
    rows = [trainer.train_step() for _ in range(8)]
    assert {r["source"] for r in rows} == source
    dataset_rows = [r for r in rows if r["source"] == "dataset"]
    # dataset batches train on the references (+ EOS): their lengths are the references' lengths + 1
    assert all(r["completion_len"] in (4.0, 5.0, 4.5) for r in dataset_rows)


def test_teacher_samples_as_off_policy_source(make_config, models: dict, tmp_path: Path) -> None:
    config = make_config(tmp_path, loss={"off_policy_fraction": 1.0, "off_policy_source": "teacher"})
    trainer = Trainer(config)
    assert trainer.train_step()["source"] == "teacher"


def test_startup_errors_name_the_problem(make_config, models: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        Trainer(make_config(tmp_path, teachers={"tb": {"path": models["other_tok"]}}))
    with pytest.raises(ValueError, match="domain 'b' has no teacher"):
        Trainer(make_config(tmp_path, teachers={"tb": {"path": models["teacher_b"], "domains": ["c"]}}))
    with pytest.raises(ValueError, match="student: no such local directory .*missing"):
        Trainer(make_config(tmp_path, student={"path": str(tmp_path / "missing")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load"):
        Trainer(make_config(tmp_path, student={"path": str(tmp_path / "empty")}))


def test_sft_and_verifier_terms_run(make_config, models: dict, tmp_path: Path) -> None:
    config = make_config(tmp_path, loss={"sft_weight": 0.5, "verifier_weight": 1.0})
    trainer = Trainer(config)
    base = make_config(tmp_path / "base")
    plain = Trainer(base).train_step()
    row = trainer.train_step()
    assert row["loss"] > plain["loss"] + 0.1  # the SFT NLL on references dominates the tiny KL


@pytest.mark.parametrize("signal_name", ["topk", "sampled"])
def test_topk_and_sampled_signals_train(make_config, tmp_path: Path, signal_name: str) -> None:
    trainer = Trainer(make_config(tmp_path, loss={"signal": signal_name, "topk": 4}))
    before = trainer.student.head.weight.detach().clone()
    row = trainer.train_step()
    assert row["skipped_steps"] == 0 and row["grad_norm"] > 0
    assert not torch.equal(before, trainer.student.head.weight)


def test_lora_student_trains_and_resumes(make_config, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    lora = {"lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}}
    opts = {"student": lora, "optim": {"steps": 2}}
    train(make_config(tmp_path / "run", **opts), stop_after=1)
    saved = tmp_path / "run" / "checkpoints" / "step-00000001" / "student"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    summary = train(make_config(tmp_path / "run", **opts), resume=True)
    assert (summary["steps"], summary["steps_run"]) == (2, 1)


def test_reference_terms_need_references(make_config, tmp_path: Path) -> None:
    path = tmp_path / "no_refs.jsonl"
    path.write_text('{"prompt": "ab=", "domain": "a"}\n{"prompt": "ba=", "domain": "b"}\n')
    with pytest.raises(ValueError, match=r"'loss\.sft_weight' trains on dataset references, but 2 prompts"):
        Trainer(make_config(tmp_path, data={"prompts": str(path)}, loss={"sft_weight": 1.0}))


class _EchoTask:
    """Prompts ``w=`` with reference ``w``; domains by the first letter (a test-local built-in task)."""

    name = "runner-test-echo"
    words = ("ab", "ba", "cafe", "bead", "face", "dead", "hag", "egg")

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        words = self.words[:6] if split == "train" else self.words[6:]
        return [Example(f"{w}=", w, "a" if w < "c" else "b") for w in words][:n]

    def verify(self, prompt: str, completion: str, reference: str) -> float:
        return float(completion.startswith(reference))


def test_builtin_task_as_prompt_source_and_verifier(make_config, tmp_path: Path) -> None:
    with contextlib.suppress(ValueError):  # already registered by an earlier run in this process
        register_task(_EchoTask.name)(_EchoTask)
    config = make_config(tmp_path, data={"prompts": "", "eval_prompts": "", "task": _EchoTask.name, "num_prompts": 6},
                         eval={"at_end": True, "num_prompts": 2})
    trainer = Trainer(config)
    pool = trainer.source.pool
    assert sorted(pool[i].prompt for i in range(len(pool))) == sorted(f"{w}=" for w in _EchoTask.words[:6])
    assert trainer.verifiers("a", "ab=", "abzz", "ab") == 1.0  # the task's verify, not exact match
    result = trainer.evaluate()
    assert set(result) >= {"greedy/accuracy/b", "reverse_kl/b"}


def test_kd_weight_zero_is_pure_sft_on_references(make_config, tmp_path: Path) -> None:
    config = make_config(tmp_path, loss={"kd_weight": 0.0, "sft_weight": 1.0, "off_policy_fraction": 1.0})
    row = Trainer(config).train_step()
    assert row["source"] == "dataset"
    assert not any(key.startswith("divergence/") for key in row)  # no teacher was consulted
    assert row["loss"] > 1.0  # the NLL of untrained tiny models on the references (ln V ~ 2.7)
    with pytest.raises(ValueError, match="nothing to learn"):
        make_config(tmp_path, loss={"kd_weight": 0.0})
