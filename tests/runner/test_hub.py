"""Model paths: local directories, or Hugging Face model ids served from a (fake, temporary) HF cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from opd_fast.cli import main
from opd_fast.runner.config import resolve_model_path
from opd_fast.runner.hub import is_model_id, model_directory

COMMITS = {"main": "a" * 40, "v2": "b" * 40}


def cache_model(cache: Path, repo_id: str, source: str, ref: str = "main") -> Path:
    """Copy a saved model into the HF cache layout (``models--org--name/snapshots/<commit>``, ``refs/<ref>``)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMITS[ref]
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(COMMITS[ref])
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, models: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline HF cache holding ``tiny/student`` (main, and ``v2`` = teacher_a's weights) and ``tiny/teacher``."""
    cache = tmp_path / "hf-cache"
    cache_model(cache, "tiny/student", models["student"])
    cache_model(cache, "tiny/student", models["teacher_a"], ref="v2")
    cache_model(cache, "tiny/teacher", models["teacher_a"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing may be downloaded here
    return cache


@pytest.mark.parametrize(("text", "is_id"), [
    ("HuggingFaceTB/SmolLM2-135M", True), ("gpt2", True), ("models/student", True),
    ("runs/x/checkpoints/step-1/student", False), ("./student", False), ("/abs/student", False), ("a//b", False),
])
def test_what_counts_as_a_model_id(text: str, is_id: bool) -> None:
    assert is_model_id(text) is is_id


def test_relative_model_paths_resolve_to_a_directory_if_one_exists_else_stay_model_ids(tmp_path: Path) -> None:
    (tmp_path / "models" / "student").mkdir(parents=True)
    assert resolve_model_path("models/student", tmp_path) == str(tmp_path / "models" / "student")
    assert resolve_model_path("org/name", tmp_path) == "org/name"
    assert resolve_model_path("a/b/c", tmp_path) == str(tmp_path / "a" / "b" / "c")  # not an id: a missing dir


def test_model_ids_resolve_to_cached_snapshots_at_their_revision(hf_cache: Path) -> None:
    assert model_directory("tiny/student") == str(hf_cache / "models--tiny--student" / "snapshots" / COMMITS["main"])
    assert model_directory("tiny/student", revision="v2").endswith(COMMITS["v2"])
    assert model_directory("tiny/student", revision=COMMITS["v2"]).endswith(COMMITS["v2"])  # a commit works too


@pytest.mark.parametrize(("path", "kwargs", "error"), [
    ("tiny/absent", {}, r"'tiny/absent': no such local directory .* and not in the Hugging Face cache .*hf-cache"
                        r".* as a model id; offline mode"),
    ("tiny/student", {"revision": "v9"}, r"not in the Hugging Face cache .* at revision 'v9'"),
    ("/no/such/dir", {}, r"no such local directory /no/such/dir$"),
])
def test_a_model_that_is_neither_a_directory_nor_cached_says_which_lookups_failed(
        hf_cache: Path, path: str, kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        model_directory(path, label="config key 'student.path'", **kwargs)


def test_a_revision_on_a_local_directory_is_refused(models: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="is a local directory, so its revision 'v2' cannot apply"):
        model_directory(models["student"], revision="v2")


def test_train_and_generate_from_model_ids_in_the_hf_cache(
        hf_cache: Path, toml_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = toml_config.read_text().splitlines()
    text = [line for line in text if not line.startswith("path = ")]
    student, teacher = text.index("[student]"), text.index("[teachers.all]")
    text[teacher + 1:teacher + 1] = ['path = "tiny/teacher"']
    text[student + 1:student + 1] = ['path = "tiny/student"', 'revision = "main"']
    toml_config.write_text("\n".join(text))
    assert main(["train", str(toml_config), "--set", "optim.steps=1", "--set", "eval.at_end=false"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())
    assert recorded["student"]["path"] == "tiny/student"  # the id as written, so a resume compares like with like
    assert main(["generate", "tiny/student", "--prompt", "ab=", "--max-new-tokens", "2"]) == 0
    assert "'ab=' -> " in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"'teachers\.all\.path' \(teacher 'all'\) = 'tiny/nope': no such local"):
        main(["train", str(toml_config), "--overwrite", "--set", "teachers.all.path='tiny/nope'"])
