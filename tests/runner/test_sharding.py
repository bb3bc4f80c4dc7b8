"""FSDP2 sharding (``runner.sharding``): 2 gloo processes against one process, and checkpoints across strategies.

As in ``test_data_parallel``, the runs decode greedily, so every completion is a function of the weights and
the prompt, and equal per-step losses over steps prove the summed gradients. The tolerance is the data-parallel
one (relative 1e-5): FSDP's reduce-scatter sums the same two per-rank gradients in fp32 as one process sums
its micro-batches, in a different order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ALPHABET
from ranks import Run, assert_same_steps, run_ranks
from safetensors import safe_open

from opd_fast.models.tiny import char_tokenizer, save_model, tiny_causal_lm
from opd_fast.runner.checkpoint import checkpoints, load_state
from opd_fast.runner.config import RunConfig
from opd_fast.runner.distributed import check_config
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.trainer import train

SECTIONS = {"rollout": {"temperature": 0.0}, "loss": {"sft_weight": 0.5},
            "optim": {"steps": 3, "schedule": "constant", "warmup_steps": 0},
            "metrics": {"progress": False, "tensorboard": False}}
FSDP = {**SECTIONS, "run": {"parallel": "fsdp"}}


def _one_teacher(config: RunConfig, shard: bool) -> RunConfig:
    """``config`` with its teacher ``ta`` alone, taking every domain (a sharded teacher must be the only one)."""
    config.teachers = {"all": dataclasses.replace(config.teachers["ta"], domains=[], shard=shard)}
    return config


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two decoder layers and a head tied to the embeddings: one parameter in two modules of the root unit."""
    tok = char_tokenizer(ALPHABET)
    lm = tiny_causal_lm(tok, hidden_size=32, num_layers=2, num_heads=2, tie_embeddings=True, seed=4)
    return str(save_model(lm, tok, tmp_path_factory.mktemp("tied") / "student"))


@pytest.mark.slow  # two 2-process groups and a one-process run: about a minute
def test_fsdp_matches_one_process_and_its_checkpoint_resumes_under_ddp_and_one_process(
        make_config, tied_student: str, tmp_path: Path) -> None:
    student = {"student": {"path": tied_student}}
    lora = make_config(tmp_path / "lora", **{**FSDP, "student": {"lora": {"r": 2}}})
    fsdp = make_config(tmp_path / "fsdp", **FSDP, **student)
    bf16 = make_config(tmp_path / "bf16", **{**FSDP, "run": {"parallel": "fsdp", "dtype": "bfloat16"},
                                             "optim": {**SECTIONS["optim"], "steps": 1}})
    two_steps = {"eval": {"num_prompts": 4, "at_end": True, "sampled": False},
                 "optim": {**SECTIONS["optim"], "steps": 2}}
    replicated = _one_teacher(make_config(tmp_path / "replicated", **{**SECTIONS, **two_steps}), shard=False)
    sharded = _one_teacher(make_config(tmp_path / "sharded", **{**FSDP, **two_steps}), shard=True)
    ranks = run_ranks(2, [Run("lora", lora), Run("fsdp", fsdp, {"stop_after": 2}), Run("bf16", bf16),
                          Run("replicated", replicated), Run("sharded", sharded)], tmp_path / "results")

    for r, out in enumerate(ranks):  # refused on every rank, before any collective (so nothing hangs)
        assert out["lora"].startswith("ValueError") and "student.lora" in out["lora"], (r, out["lora"])

    assert ranks[0]["fsdp"] == {**ranks[1]["fsdp"], "steps_per_s": ranks[0]["fsdp"]["steps_per_s"],
                                "tokens_per_s": ranks[0]["fsdp"]["tokens_per_s"]}
    [written] = checkpoints(tmp_path / "fsdp")
    state = load_state(written)  # the one-process format: parameter indices, full (unsharded) tensors
    assert sorted(state["learner"]["optimizer"]["state"]) == list(range(len(state["learner"]["optimizer"]["state"])))
    with safe_open(written / "student" / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: saved once, as HF does
    assert math.isfinite(ranks[0]["bf16"]["final_loss"]) and ranks[0]["bf16"] == ranks[1]["bf16"] | {
        k: ranks[0]["bf16"][k] for k in ("steps_per_s", "tokens_per_s")}
    with safe_open(Path(ranks[0]["bf16"]["checkpoint"]) / "student" / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_tensor(k).dtype for k in list(weights.keys())}
    assert dtypes == {torch.float32}  # bf16 compute, fp32 master weights

    # a sharded teacher (under a sharded student) gives the replicated teacher's losses and evaluation
    assert_same_steps(read_metrics(tmp_path / "replicated"), read_metrics(tmp_path / "sharded"))
    want_eval, got_eval = ranks[0]["replicated"]["eval"], ranks[0]["sharded"]["eval"]
    assert want_eval and got_eval.keys() == want_eval.keys()
    assert got_eval == pytest.approx(want_eval, rel=1e-5)
    assert ranks[1]["sharded"]["eval"] == got_eval  # every rank evaluated (its sharded forwards paired up)

    train(make_config(tmp_path / "one", **SECTIONS, **student))
    under_one = tmp_path / "under_one"
    shutil.copytree(tmp_path / "fsdp", under_one)
    train(make_config(under_one, **SECTIONS, **student), resume=True)  # fsdp checkpoint, one process
    ddp = make_config(tmp_path / "fsdp", **SECTIONS, **student)  # the same run directory, continued data parallel
    resumed = run_ranks(2, [Run("ddp", ddp, {"resume": True})], tmp_path / "resumed")
    assert resumed[0]["ddp"]["steps_run"] == 1
    for run_dir in (under_one, tmp_path / "fsdp"):
        assert_same_steps(read_metrics(tmp_path / "one"), read_metrics(run_dir))


@pytest.mark.parametrize(("sections", "sharded", "key"), [
    ({"run": {"parallel": "fsdp"}, "student": {"lora": {"r": 2}}}, None, "student.lora"),
    ({}, "ta", "teachers.ta.shard"),  # one of two teachers: routing sends ranks to different ones
    ({"loss": {"off_policy_fraction": 0.5, "off_policy_source": "teacher"}}, "all", "teachers.all.shard"),
])
def test_refused_before_any_collective(make_config, tmp_path: Path, sections: dict, sharded: str | None,
                                       key: str) -> None:
    config = make_config(tmp_path, **sections)
    if sharded == "all":
        config = _one_teacher(config, shard=True)
    elif sharded is not None:
        config.teachers[sharded].shard = True
    check_config(config, 1)  # one process: nothing is sharded, nothing to refuse
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_config(config, 2)


def test_sharding_keys_may_change_on_resume(make_config, tmp_path: Path) -> None:
    """Checkpoints hold full state dicts, so the strategy is not part of a run's state (one process: ignored)."""
    train(make_config(tmp_path, optim={"steps": 2}), stop_after=1)
    config = make_config(tmp_path, optim={"steps": 2}, run={"parallel": "fsdp"})
    config.teachers["ta"].shard = True
    assert train(config, resume=True)["steps"] == 2
    [_, resumed] = (tmp_path / "config_history.jsonl").read_text().splitlines()
    assert json.loads(resumed)["changed"] == {"run.parallel": ["ddp", "fsdp"], "teachers.ta.shard": [False, True]}
