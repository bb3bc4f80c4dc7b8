"""FSDP2 sharding (``runner.sharding``): 2 gloo processes against one process, and checkpoints across strategies.

As in ``test_data_parallel``, the runs decode greedily, so every completion is a function of the weights and
the prompt, and equal per-step losses over steps prove the summed gradients. The tolerance is the data-parallel
one (relative 1e-5), not bit equality: one process accumulates its micro-batches' gradients in ``.grad`` while
FSDP sums the ranks' in a reduce-scatter and computes from gathered copies, so fp32 rounding differs (about 1e-7
relative on these runs).
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
from ranks import DEVICE, Run, assert_same_steps, run_ranks
from safetensors import safe_open

from opd_fast.models.tiny import char_tokenizer, save_model, tiny_causal_lm
from opd_fast.runner.checkpoint import checkpoints, load_state
from opd_fast.runner.config import RunConfig
from opd_fast.runner.distributed import check_config
from opd_fast.runner.metrics import read_metrics
from opd_fast.runner.trainer import train

SECTIONS = {"run": {"device": DEVICE}, "rollout": {"temperature": 0.0}, "loss": {"sft_weight": 0.5},
            "optim": {"steps": 4, "schedule": "constant", "warmup_steps": 0},
            "metrics": {"progress": False, "tensorboard": False}}
FSDP = {**SECTIONS, "run": {"device": DEVICE, "parallel": "fsdp"}}


def _student(path: str) -> dict:
    return {"student": {"path": path}}


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


@pytest.fixture(scope="module")
def group(make_config, tied_student: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """One 2-process group running, in order: a refused config; 2 of 4 FSDP steps (tied student, activation
    checkpointing); one bf16 step; 2 steps with one replicated teacher under DDP and with it sharded under FSDP,
    each evaluated at the end; the same with both teachers of the routed two-teacher config; 2 steps under DDP and
    under FSDP where rank 1's loss is NaN."""
    root = tmp_path_factory.mktemp("sharding")
    lora = make_config(root / "lora", **{**FSDP, "student": {"lora": {"r": 2}}})
    fsdp = make_config(root / "fsdp", **FSDP, **_student(tied_student))
    fsdp.student.gradient_checkpointing = True  # recomputed layers inside FSDP units: the same gradients
    bf16 = make_config(root / "bf16", **{**FSDP, "run": {**FSDP["run"], "dtype": "bfloat16"},
                                         "optim": {**SECTIONS["optim"], "steps": 1}})
    two_steps = {"eval": {"num_prompts": 4, "at_end": True, "sampled": False},
                 "optim": {**SECTIONS["optim"], "steps": 2}}
    replicated = _one_teacher(make_config(root / "replicated", **{**SECTIONS, **two_steps}), shard=False)
    sharded = _one_teacher(make_config(root / "sharded", **{**FSDP, **two_steps}), shard=True)
    verifier = root / "nan_on_rank_1.py"  # rank 1's rewards, hence its loss, are NaN
    verifier.write_text("import math, os\n\ndef verify(prompt, completion, reference):\n"
                        "    return math.nan if os.environ['RANK'] == '1' else 1.0\n")
    nan = {"loss": {**SECTIONS["loss"], "verifier_weight": 0.5,
                    "verifiers": {d: f"{verifier}:verify" for d in ("a", "b")}}, "optim": two_steps["optim"]}
    two_replicated = make_config(root / "two_replicated", **{**SECTIONS, **two_steps})
    two_sharded = make_config(root / "two_sharded", **{**SECTIONS, **two_steps})
    for teacher in two_sharded.teachers.values():  # routed by domain: a rank may have no rows for one of them
        teacher.shard = True
    nan_ddp = make_config(root / "nan_ddp", **{**SECTIONS, **nan})
    nan_fsdp = make_config(root / "nan_fsdp", **{**FSDP, **nan})
    runs = [Run("lora", lora), Run("fsdp", fsdp, {"stop_after": 2}), Run("bf16", bf16), Run("replicated", replicated),
            Run("sharded", sharded), Run("two_replicated", two_replicated), Run("two_sharded", two_sharded),
            Run("nan_ddp", nan_ddp), Run("nan_fsdp", nan_fsdp)]
    return root, run_ranks(2, runs, root / "results")


def _same_summary(ranks: list[dict], name: str) -> dict:
    """A run's summary, equal on both ranks but for their own timings."""
    timings = ("steps_per_s", "tokens_per_s")
    assert {k: v for k, v in ranks[0][name].items() if k not in timings} == {
        k: v for k, v in ranks[1][name].items() if k not in timings}
    return ranks[0][name]


@pytest.mark.slow  # the 2-process group: about 30 s, once for the module
def test_refused_on_every_rank_without_a_hang(group: tuple[Path, list[dict]]) -> None:
    for r, out in enumerate(group[1]):  # before any collective: the later runs of the group still ran
        assert out["lora"].startswith("ValueError") and "student.lora" in out["lora"], (r, out["lora"])


@pytest.mark.slow  # the 2-process group: about 30 s, once for the module
def test_checkpoints_keep_the_one_process_format(group: tuple[Path, list[dict]]) -> None:
    root, ranks = group
    assert _same_summary(ranks, "fsdp")["steps"] == 2
    [written] = checkpoints(root / "fsdp")
    optimizer = load_state(written)["learner"]["optimizer"]  # parameter indices, full (unsharded) tensors
    assert sorted(optimizer["state"]) == optimizer["param_groups"][0]["params"] == list(range(len(optimizer["state"])))
    with safe_open(written / "student" / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: saved once, as HF does
    assert math.isfinite(_same_summary(ranks, "bf16")["final_loss"])
    with safe_open(Path(ranks[0]["bf16"]["checkpoint"]) / "student" / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_tensor(k).dtype for k in list(weights.keys())}
    assert dtypes == {torch.float32}  # bf16 compute, fp32 master weights


@pytest.mark.slow  # the 2-process group: about 30 s, once for the module
@pytest.mark.parametrize("runs", [("replicated", "sharded"), ("two_replicated", "two_sharded")])
def test_sharded_teachers_match_replicated_in_training_and_evaluation(group: tuple[Path, list[dict]],
                                                                     runs: tuple[str, str]) -> None:
    (root, ranks), (replicated, sharded) = group, runs
    assert_same_steps(read_metrics(root / replicated), read_metrics(root / sharded))
    want, got = _same_summary(ranks, replicated)["eval"], _same_summary(ranks, sharded)["eval"]
    assert want and got.keys() == want.keys()  # every rank evaluated, and their sharded forwards paired up
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow  # the 2-process group: about 30 s, once for the module
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(group: tuple[Path, list[dict]],
                                                                    strategy: str) -> None:
    summary = _same_summary(group[1], f"nan_{strategy}")  # and no rank waited for another's collective
    assert summary["steps"] == summary["skipped_steps"] == 2
    assert [math.isnan(r["loss"]) for r in read_metrics(group[0] / f"nan_{strategy}")] == [True, True]


@pytest.mark.slow  # a second 2-process group and two one-process runs
def test_fsdp_matches_one_process_and_resumes_across_strategies(make_config, tied_student: str,
                                                                group: tuple[Path, list[dict]]) -> None:
    """FSDP steps 1-2 then DDP steps 3-4 (the same directory), and FSDP 1-2, one process 3, FSDP 4 (a copy):
    both equal an uninterrupted one-process run step by step."""
    root = group[0]
    train(make_config(root / "one", **SECTIONS, **_student(tied_student)))
    mixed = root / "mixed"
    shutil.copytree(root / "fsdp", mixed)
    train(make_config(mixed, **SECTIONS, **_student(tied_student)), resume=True, stop_after=3)
    ddp = make_config(root / "fsdp", **SECTIONS, **_student(tied_student))
    fsdp = make_config(mixed, **FSDP, **_student(tied_student))
    resumed = run_ranks(2, [Run("ddp", ddp, {"resume": True}), Run("fsdp", fsdp, {"resume": True})],
                        root / "resumed")
    assert _same_summary(resumed, "ddp")["steps_run"] == 2 and _same_summary(resumed, "fsdp")["steps_run"] == 1
    for run_dir in (root / "fsdp", mixed):
        assert_same_steps(read_metrics(root / "one"), read_metrics(run_dir))


@pytest.mark.parametrize(("sections", "sharded", "key"), [
    ({"run": {"parallel": "fsdp"}, "student": {"lora": {"r": 2}}}, None, "student.lora"),
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
