"""Fixtures for the runner tests: tiny Llama/Qwen2 models on disk and small configs around them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from opd_fast.models.tiny import char_tokenizer, save_model, tiny_causal_lm
from opd_fast.runner.config import RunConfig, config_from_dict

ALPHABET = "abcdefgh =\n"


def make_model(path: Path, arch: str, seed: int, alphabet: str = ALPHABET, hidden: int = 32) -> str:
    tok = char_tokenizer(alphabet)
    save_model(tiny_causal_lm(tok, arch=arch, hidden_size=hidden, num_layers=1, num_heads=2, seed=seed), tok, path)
    return str(path)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded on the shared CI cores; restore torch's setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """student (llama), two teachers (qwen2, wider), and a teacher with a different tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {
        "student": make_model(root / "student", "llama", 0),
        "teacher_a": make_model(root / "teacher_a", "qwen2", 1, hidden=48),
        "teacher_b": make_model(root / "teacher_b", "llama", 2, hidden=48),
        "other_tok": make_model(root / "other_tok", "qwen2", 3, alphabet="hgfedcba =\n"),
    }


@pytest.fixture(scope="session")
def padded_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A wider Llama teacher whose head has 6 rows beyond the tokenizer's vocabulary."""
    tok = char_tokenizer(ALPHABET)
    model = tiny_causal_lm(tok, hidden_size=64, num_layers=1, num_heads=2, seed=5)
    model.resize_token_embeddings(len(tok) + 6)
    torch.nn.init.normal_(model.get_output_embeddings().weight)  # padded rows with real mass: they must be cut
    return str(save_model(model, tok, tmp_path_factory.mktemp("padded") / "teacher"))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": f"{w}=", "domain": dom, "reference": w if dom == "a" else w[::-1]}
            for w in ("abc", "bad", "cafe", "dead", "face", "head") for dom in ("a", "b")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _make_config(models: dict[str, str], prompts: str, out_dir: Path, **sections: dict) -> RunConfig:
    """A two-teacher config (domain a -> teacher_a, b -> teacher_b), small and fast; sections override."""
    data = {
        "run": {"out_dir": str(out_dir), "seed": 0},
        "student": {"path": models["student"]},
        "teachers": {
            "ta": {"path": models["teacher_a"], "domains": ["a"]},
            "tb": {"path": models["teacher_b"], "domains": ["b"]},
        },
        "data": {"prompts": prompts, "eval_prompts": prompts, "prompts_per_step": 2, "group_size": 2},
        "rollout": {"max_new_tokens": 6, "micro_batch_size": 2},
        "optim": {"steps": 3, "lr": 1e-2},
        "checkpoint": {"every": 0, "keep": 2},
        "metrics": {"progress": False, "tensorboard": False},
        "eval": {"num_prompts": 4, "at_end": False},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config_from_dict(data)


@pytest.fixture(scope="session")
def make_config(models: dict[str, str], prompts_file: str) -> Callable[..., RunConfig]:
    """``make_config(out_dir, **sections)``: the two-teacher test config with overridden sections."""
    return lambda out_dir, **sections: _make_config(models, prompts_file, out_dir, **sections)


@pytest.fixture
def toml_config(tmp_path: Path, models: dict[str, str], prompts_file: str) -> Path:
    """``tmp_path/run.toml``: a one-teacher, two-step CLI config whose ``out_dir`` (``out``) is relative."""
    path = tmp_path / "run.toml"
    path.write_text(f"""
[run]
out_dir = "out"
threads = 1
[student]
path = "{models["student"]}"
[teachers.all]
path = "{models["teacher_a"]}"
[data]
prompts = "{prompts_file}"
eval_prompts = "{prompts_file}"
prompts_per_step = 2
[rollout]
max_new_tokens = 4
[optim]
steps = 2
[checkpoint]
every = 1
[metrics]
progress = false
tensorboard = false
[eval]
num_prompts = 2
sampled = false
""")
    return path
