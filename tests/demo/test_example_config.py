"""examples/demo/on_policy.toml is the demo's own on-policy reverse-KL arm, written out for `opd-fast train`."""

from pathlib import Path

from opd_fast.demo.arms import ARMS_BY_NAME, run_config
from opd_fast.demo.profiles import DEFAULT
from opd_fast.runner.config import config_to_dict, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo" / "on_policy.toml"


def _comparable(config) -> dict:
    data = config_to_dict(config)
    for section, key in (("run", "out_dir"), ("student", "path"), ("metrics", "progress")):
        data[section].pop(key)
    data["teachers"]["main"].pop("path")
    return data


def test_example_matches_the_demo_arm(tmp_path):
    example = load_config(EXAMPLE)
    demo = run_config(ARMS_BY_NAME["on_policy_rkl"], DEFAULT, tmp_path / "s", tmp_path / "t", tmp_path / "o", 0)
    assert _comparable(example) == _comparable(demo)
    assert example.student.path.endswith("runs/demo-cache/student-seed0")
    assert example.teachers["main"].path.endswith("runs/demo-cache/teacher")
