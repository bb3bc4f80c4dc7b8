"""examples/demo/on_policy.toml is the demo's own on-policy reverse-KL arm, written out for `opd-fast train`."""

from pathlib import Path

from opd_fast.demo.arms import ARMS_BY_NAME, DemoData, run_config
from opd_fast.demo.domains import DOMAINS
from opd_fast.demo.profiles import DEFAULT
from opd_fast.runner.config import config_to_dict, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo" / "on_policy.toml"


def _comparable(config) -> dict:
    data = config_to_dict(config)
    for section, key in (("run", "out_dir"), ("student", "path"), ("metrics", "progress"), ("data", "prompts"),
                         ("data", "eval_prompts")):
        data[section].pop(key)
    for teacher in data["teachers"].values():
        teacher.pop("path")
    return data


def test_example_matches_the_demo_arm(tmp_path):
    example = load_config(EXAMPLE)
    teachers = {d.name: tmp_path / d.name for d in DOMAINS}
    data = DemoData(tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    demo = run_config(ARMS_BY_NAME["on_policy_rkl"], DEFAULT, tmp_path / "s", teachers, data, tmp_path / "o", 0)
    assert _comparable(example) == _comparable(demo)
    assert example.student.path.endswith("runs/demo-cache/student-seed0")
    for d in DOMAINS:
        assert example.teachers[d.name].path.endswith(f"runs/demo-cache/teacher-{d.name}")
    assert example.data.prompts.endswith("runs/demo-default/data/train.jsonl")
