"""Prompt data formats: which file holds the prompts, and how one of its rows becomes an ``Example``.

Formats (``data.format``, ``"auto"`` by default: a directory is a ``save_to_disk`` dataset, a file goes
by its suffix): ``jsonl`` is read by the runner itself (memory-mapped, validated line by line, see
``data.PromptPool``); ``json``, ``csv``, ``parquet`` and ``arrow`` files and ``dataset_dir``
directories are opened with Hugging Face ``datasets`` (Arrow on disk, memory-mapped; a
``DatasetDict`` directory gives ``data.split`` for training and ``data.eval_split`` for evaluation).

A row's fields, by column (``data.columns`` maps a field to another column name):

- ``prompt``: a string, or a conversation (a list of ``{"role", "content"}`` messages, TRL's
  conversational ``prompt``);
- ``messages``: a whole conversation instead of ``prompt``; a final assistant turn is the reference
  completion and the turns before it are the prompt;
- ``reference``: the reference completion (a string or a list of messages), read from the column
  ``reference`` or TRL's ``completion``; off-policy and SFT steps train on it;
- ``domain``: routes the row to its teacher (``"default"`` when absent).

Conversations are always rendered with the tokenizer's chat template (``data.encode_prompt``).

Public API: ``FIELDS``, ``FORMATS``, ``Columns``, ``detect_format``, ``open_dataset``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..tasks import Example, Message

Format = Literal["jsonl", "json", "csv", "parquet", "arrow", "dataset_dir"]
FORMATS: tuple[str, ...] = ("auto", "jsonl", "json", "csv", "parquet", "arrow", "dataset_dir")
SUFFIXES: dict[str, Format] = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
                               ".arrow": "arrow"}
FIELDS = ("prompt", "messages", "reference", "domain")
REFERENCE_COLUMNS = ("reference", "completion")  # ours, then TRL's name


def detect_format(path: str | Path, declared: str = "auto") -> Format:
    """The format of ``path``: ``declared`` unless ``"auto"``, else a directory or the file's suffix."""
    if declared != "auto":
        return declared  # type: ignore[return-value]  # validated by the config
    path = Path(path)
    if path.is_dir():
        return "dataset_dir"
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    raise ValueError(f"cannot tell the format of prompt file {path} from its suffix: set config key 'data.format' "
                     f"to one of {FORMATS[1:]} (or use a {', '.join(SUFFIXES)} file)")


def open_dataset(path: str | Path, fmt: Format, split: str) -> Any:
    """A ``datasets.Dataset`` over the file or directory (memory-mapped Arrow, nothing downloaded)."""
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"reading {path} as {fmt} needs the datasets package: pip install 'opd-fast[data]' "
                         "(or use a JSONL file)") from exc

    path = Path(path)
    if not path.exists():
        raise ValueError(f"no prompt data at {path}")
    try:
        if fmt == "dataset_dir":
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        raise ValueError(f"cannot read {path} as {fmt}: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"dataset {path} has no split {split!r} (data.split / data.eval_split); splits: "
                             f"{sorted(loaded)}")
        loaded = loaded[split]
    return loaded


def _messages(value: Any, where: str, field: str) -> list[Message]:
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise ValueError(f"{where}: {field!r} must be a string or a list of {{'role', 'content'}} messages, got "
                         f"{str(value)[:80]!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


@dataclass(frozen=True)
class Columns:
    """The column each field is read from (``None``: the data has no such column)."""

    prompt: str | None
    messages: str | None
    reference: str | None
    domain: str | None

    @classmethod
    def resolve(cls, mapping: dict[str, str], available: list[str] | None, where: str) -> Columns:
        """Columns from ``data.columns`` (its field names are checked by the config) and the default names;
        ``available`` = the data's columns (``None`` for JSONL, whose lines are checked one by one)."""
        if available is not None:
            missing = sorted(f"{f} -> {c!r}" for f, c in mapping.items() if c not in available)
            if missing:
                raise ValueError(f"{where}: config key 'data.columns' names columns the data lacks "
                                 f"({', '.join(missing)}); columns: {available}")

        def pick(field: str, defaults: tuple[str, ...]) -> str | None:
            if field in mapping:
                return mapping[field]
            found = [c for c in defaults if available is None or c in available]
            if available is not None and len(found) > 1:
                raise ValueError(f"{where}: columns {found} could each be the {field}; choose one with "
                                 f"data.columns.{field}")
            return found[0] if found else None

        columns = cls(pick("prompt", ("prompt",)), pick("messages", ("messages",)),
                      pick("reference", REFERENCE_COLUMNS if available is not None else ("reference",)),
                      pick("domain", ("domain",)))
        if available is not None and (columns.prompt is None) == (columns.messages is None):
            raise ValueError(f"{where}: the data needs exactly one of a prompt column ('prompt') or a conversation "
                             f"column ('messages'), mapped by data.columns if named otherwise; columns: {available}")
        return columns

    @property
    def names(self) -> set[str]:
        """Every column a row may carry (JSONL lines with other keys are refused, since they are typos)."""
        named = {self.prompt, self.messages, self.reference, self.domain}
        if self.reference == "reference":
            named.add("completion")
        return {n for n in named if n is not None}

    def example(self, row: dict[str, Any], where: str) -> Example:
        """One row as an ``Example``; errors name ``where`` (file and line, or row)."""
        prompt_value = row.get(self.prompt) if self.prompt else None
        messages_value = row.get(self.messages) if self.messages else None
        if (prompt_value is None) == (messages_value is None):
            raise ValueError(f"{where}: each row needs exactly one of {self.prompt!r} (a prompt) or {self.messages!r} "
                             f"(a conversation), got {str(row)[:80]!r}")
        reference = self._reference(row, where)
        if messages_value is not None:
            turns = _messages(messages_value, where, self.messages)
            if turns and turns[-1]["role"] == "assistant":
                reference = reference or turns[-1]["content"]
                turns = turns[:-1]
            if not turns:
                raise ValueError(f"{where}: {self.messages!r} has no turn before the assistant's answer")
            prompt: str | list[Message] = turns
        else:
            prompt = prompt_value if isinstance(prompt_value, str) else _messages(prompt_value, where, self.prompt)
        domain = row.get(self.domain) if self.domain else None
        if domain is not None and not isinstance(domain, str):
            raise ValueError(f"{where}: {self.domain!r} must be a string, got {domain!r}")
        return Example(prompt, reference, domain or "default")

    def _reference(self, row: dict[str, Any], where: str) -> str:
        names = [self.reference] if self.reference != "reference" else list(REFERENCE_COLUMNS)
        given = [n for n in names if n is not None and row.get(n) is not None]
        if len(given) > 1:
            raise ValueError(f"{where}: both {given} are set; keep one reference completion")
        if not given:
            return ""
        value = row[given[0]]
        return value if isinstance(value, str) else "".join(m["content"] for m in _messages(value, where, given[0]))
