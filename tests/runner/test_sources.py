"""Prompt data formats (JSONL, Hugging Face datasets files and directories), conversations, column mapping."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest

from opd_fast.cli import main
from opd_fast.runner.config import DataConfig, config_from_dict
from opd_fast.runner.data import PromptPool, encode_prompt
from opd_fast.runner.models import load_model
from opd_fast.tasks import Example

ROWS = [{"prompt": "ab=", "completion": "ab", "domain": "a"}, {"prompt": "ba=", "completion": "", "domain": "b"},
        {"prompt": "cd=", "completion": "dc", "domain": "a"}]
EXPECTED = [Example("ab=", "ab", "a"), Example("ba=", "", "b"), Example("cd=", "dc", "a")]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"


def write(rows: list[dict], path: Path) -> Path:
    """``rows`` in the format ``path`` names: a suffix, or a directory (``save_to_disk``; ``*-dict``: a DatasetDict)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    if path.suffix in (".json", ".txt"):
        path.write_text(json.dumps(rows))
        return path
    dataset = datasets.Dataset.from_list(rows)
    if path.suffix == ".csv":
        dataset.to_csv(str(path))
    elif path.suffix == ".parquet":
        dataset.to_parquet(str(path))
    elif path.suffix == ".arrow":
        saved = path.with_suffix(".saved")
        dataset.save_to_disk(str(saved))
        shutil.copy(next(saved.glob("*.arrow")), path)
    elif path.name.endswith("-dict"):
        datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(path))
    else:
        dataset.save_to_disk(str(path))
    return path


def examples(pool: PromptPool) -> list[Example]:
    return [pool[i] for i in range(len(pool))]


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "p.csv", "p.parquet", "p.arrow", "saved", "saved-dict"])
def test_every_format_gives_the_same_pool(tmp_path: Path, name: str) -> None:
    path = write(ROWS, tmp_path / name)
    pool = PromptPool.open(path, DataConfig(prompts=str(path)), "train")
    expected = EXPECTED if name != "p.csv" else [Example(e.prompt, e.reference, e.domain) for e in EXPECTED]
    assert examples(pool) == expected
    assert pool.missing_references == 1 and sorted(pool.domain_names) == ["a", "b"]
    if name == "saved-dict":
        assert examples(PromptPool.open(path, DataConfig(), "test")) == EXPECTED[:1]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversations_and_column_mapping(tmp_path: Path, suffix: str) -> None:
    chat = [{"messages": [{"role": "user", "content": "ab="}, {"role": "assistant", "content": "ab"}], "topic": "a"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "ba="}], "topic": "b"}]
    path = write(chat, tmp_path / f"chat{suffix}")
    pool = PromptPool.open(path, DataConfig(columns={"domain": "topic"}), "train")
    system = {"role": "system", "content": "s"}
    assert examples(pool) == [Example([{"role": "user", "content": "ab="}], "ab", "a"),
                              Example([system, {"role": "user", "content": "ba="}], "", "b")]
    trl = [{"question": [{"role": "user", "content": "ab="}], "answer": [{"role": "assistant", "content": "ab"}]}]
    path = write(trl, tmp_path / f"trl{suffix}")
    pool = PromptPool.open(path, DataConfig(columns={"prompt": "question", "reference": "answer"}), "train")
    assert examples(pool) == [Example([{"role": "user", "content": "ab="}], "ab", "default")]


@pytest.mark.parametrize(("rows", "data", "error"), [
    (ROWS, DataConfig(columns={"prompt": "question"}), r"names columns the data lacks \(prompt -> 'question'\)"),
    ([{"text": "a"}], DataConfig(), r"exactly one of a prompt column \('prompt'\) or a conversation column"),
    ([{"prompt": "a", "reference": "x", "completion": "y"}], DataConfig(),
     r"columns \['reference', 'completion'\] could each be the reference; choose one with data.columns.reference"),
    ([{"prompt": 3}], DataConfig(), r"row 0: 'prompt' must be a string or a list of \{'role', 'content'\} messages"),
    ([{"messages": [{"role": "assistant", "content": "x"}]}], DataConfig(), "has no turn before the assistant"),
])
def test_dataset_errors_name_the_problem(tmp_path: Path, rows: list[dict], data: DataConfig, error: str) -> None:
    path = write(rows, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=error):
        PromptPool.open(path, data, "train")


@pytest.mark.parametrize(("setup", "error"), [
    (lambda p: write(ROWS, p / "p.txt"), r"cannot tell the format of prompt file .*p\.txt.*data\.format"),
    (lambda p: write(ROWS, p / "saved-dict"), r"has no split 'dev' \(data\.split / data\.eval_split\); splits: "),
    (lambda p: p / "absent.parquet", "no prompt data at"),
])
def test_format_errors(tmp_path: Path, setup: Callable[[Path], Path], error: str) -> None:
    path = setup(tmp_path)
    with pytest.raises(ValueError, match=error):
        PromptPool.open(path, DataConfig(), "dev")


@pytest.mark.parametrize(("data", "error"), [
    ({"format": "xml"}, r"'data\.format' must be one of"),
    ({"columns": {"answer": "a"}}, r"'data\.columns\.answer' must be one of \('prompt', 'messages', 'reference'"),
])
def test_data_config_validation(data: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        config_from_dict({"student": {"path": "s"}, "teachers": {"t": {"path": "t"}},
                          "data": {"prompts": "p.jsonl", **data}})


def test_conversations_use_the_chat_template(models: dict[str, str]) -> None:
    tokenizer = load_model(models["student"]).tokenizer
    with pytest.raises(ValueError, match="is a conversation .* has no chat template"):
        encode_prompt(tokenizer, [{"role": "user", "content": "ab"}])
    tokenizer.chat_template = TEMPLATE
    assert encode_prompt(tokenizer, [{"role": "user", "content": "ab"}]) == tokenizer("ab=")["input_ids"]


COMMON = ["--set", "optim.steps=1", "--set", "eval.at_end=false", "--set", "checkpoint.every=0"]


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "p.csv", "p.parquet", "p.arrow", "saved", "saved-dict"])
def test_train_on_trl_prompt_completion_rows_in_every_format(toml_config: Path, tmp_path: Path, name: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    path = write([{**r, "completion": r["completion"] or "x"} for r in ROWS], tmp_path / name)
    # off-policy steps train on the data's completion column, so every row's completion is read and used
    assert main(["train", str(toml_config), *COMMON, "--set", f"data.prompts='{path}'",
                 "--set", "loss.off_policy_fraction=1.0"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1


def test_train_on_conversations_with_the_chat_template(toml_config: Path, tmp_path: Path, models: dict[str, str],
                                                       capsys: pytest.CaptureFixture) -> None:
    for role in ("student", "teacher_a"):  # the same tiny models, with a chat template
        shutil.copytree(models[role], tmp_path / role)
        config = json.loads((tmp_path / role / "tokenizer_config.json").read_text())
        (tmp_path / role / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    chat = write([{"messages": [{"role": "user", "content": "ab"}]}], tmp_path / "chat.jsonl")
    assert main(["train", str(toml_config), *COMMON, "--set", f"data.prompts='{chat}'",
                 "--set", f"student.path='{tmp_path / 'student'}'",
                 "--set", f"teachers.all.path='{tmp_path / 'teacher_a'}'"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1
