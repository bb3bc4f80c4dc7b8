"""Where a model's files are: a local directory, or a Hugging Face model id served from the HF cache.

A config's ``student.path`` / ``teachers.NAME.path`` is a local directory when one exists there
(relative paths are resolved against the config file's directory by ``load_config``); otherwise a
string shaped like a Hub id (``org/name``) is a model id, looked up in the local Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE``) at its ``revision``. Every later stage reads the resolved snapshot
directory, so the runner's checks and loaders see one kind of input.

Downloads: with ``local_files_only`` or ``HF_HUB_OFFLINE=1`` only the cache is read. Otherwise a model
missing from the cache is fetched once (config, safetensors weights, tokenizer files) into the cache. A
cached revision is used as it is, without asking the Hub for a newer commit of a branch, so a run's
start needs no network once its models are cached.

Public API: ``model_directory``, ``is_model_id``.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

# What a causal LM needs from its Hub repository (remote code included, for trust_remote_code models).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja")


def is_model_id(text: str) -> bool:
    """``org/name`` or ``name`` as the Hub spells repository ids (not a path with more parts, not ``./x``)."""
    if not text or text.startswith((".", "/", "~")) or text.count("/") > 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _offline(local_files_only: bool) -> bool:
    return local_files_only or bool(constants.HF_HUB_OFFLINE)


def model_directory(path: str, *, revision: str = "", local_files_only: bool = False, label: str = "model") -> str:
    """The local directory holding the model ``path`` names; ``ValueError`` says which lookup failed.

    ``label`` names the source in errors (``"config key 'student.path'"``)."""
    if Path(path).is_dir():
        if revision:
            raise ValueError(f"{label} = {path!r} is a local directory, so its revision {revision!r} cannot apply; "
                             "revision only selects a version of a Hub model id")
        return path
    if not is_model_id(path):
        raise ValueError(f"{label}: no such local directory {path}")
    offline = _offline(local_files_only)
    try:
        return snapshot_download(path, revision=revision or None, local_files_only=True)
    except (OSError, ValueError) as exc:  # not cached (LocalEntryNotFoundError), a revision never fetched
        error = exc
    if not offline:
        try:
            return snapshot_download(path, revision=revision or None, allow_patterns=list(HUB_PATTERNS))
        except (OSError, ValueError) as exc:  # no network, no such repository or revision
            error = exc
    why = "offline mode (HF_HUB_OFFLINE / local_files_only), so nothing is downloaded" if offline else (
        f"fetching it from the Hub failed: {type(error).__name__}: {str(error).splitlines()[0]}")
    at = f" at revision {revision!r}" if revision else ""
    raise ValueError(
        f"{label} = {path!r}: no such local directory (relative paths are taken from the config file's directory), "
        f"and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) as a model id{at}; {why}"
    ) from error
