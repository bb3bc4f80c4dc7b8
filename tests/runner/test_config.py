from pathlib import Path

import pytest

from opd_fast.runner.config import apply_overrides, config_from_dict, load_config


def base() -> dict:
    return {"student": {"path": "s"}, "teachers": {"t": {"path": "t"}}, "data": {"task": "x"}}


def test_unknown_key_is_named() -> None:
    data = base()
    data["optim"] = {"lrr": 1.0}
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lrr'"):
        config_from_dict(data)
    with pytest.raises(ValueError, match=r"unknown config key 'bogus'"):
        config_from_dict({**base(), "bogus": {}})


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("optim", {"lr": -1.0}, "optim.lr"),
        ("optim", {"steps": "ten"}, "optim.steps"),
        ("loss", {"divergence": "kl"}, "loss.divergence"),
        ("loss", {"off_policy_fraction": 1.5}, "loss.off_policy_fraction"),
        ("rollout", {"top_p": 0.0}, "rollout.top_p"),
        ("rollout", {"stop": "x"}, "rollout.stop"),
        ("rollout", {"handoff_fraction": 1.5}, "rollout.handoff_fraction"),
        ("data", {"group_size": 0}, "data.group_size"),
        ("run", {"dtype": "float8"}, "run.dtype"),
        ("run", {"parallel": "zero3"}, "run.parallel"),
    ],
)
def test_bad_values_name_the_key(section: str, values: dict, key: str) -> None:
    data = base()
    data[section] = {**data.get(section, {}), **values}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_from_dict(data)


def test_exactly_one_prompt_source_and_a_teacher() -> None:
    with pytest.raises(ValueError, match="data.prompts"):
        config_from_dict({**base(), "data": {"task": "x", "prompts": "p.jsonl"}})
    with pytest.raises(ValueError, match="teachers"):
        config_from_dict({**base(), "teachers": {}})


def test_overrides_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "models" / "s").mkdir(parents=True)  # an existing directory (else "models/s" is a model id)
    (tmp_path / "c.toml").write_text(
        '[student]\npath = "models/s"\n[teachers.t]\npath = "/abs/t"\n[data]\ntask = "x"\n[optim]\nlr = 0.1\n'
    )
    c = load_config(tmp_path / "c.toml", ["optim.lr=1e-3", 'rollout.stop=["\\n"]', "teachers.t.weight=2",
                                          "run.out_dir=out"])
    assert c.optim.lr == 1e-3 and c.rollout.stop == ["\n"] and c.teachers["t"].weight == 2.0
    assert c.student.path == str(tmp_path / "models/s") and c.teachers["t"].path == "/abs/t"
    assert c.run.out_dir == str(tmp_path / "out")
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ValueError, match=r"optim\.lr"):
        load_config(tmp_path / "c.toml", ["optim.lr=fast"])
