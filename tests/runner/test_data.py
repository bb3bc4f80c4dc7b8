import json
from pathlib import Path

import pytest

from opd_fast.runner.data import PromptSource, read_examples
from opd_fast.tasks import Example


def pool() -> list[Example]:
    return [Example(f"p{i}", "", "x" if i < 4 else "y") for i in range(8)]


def test_groups_mixture_and_determinism() -> None:
    src = PromptSource(pool(), prompts_per_step=3, group_size=2, mixture={"x": 1.0, "y": 0.0}, seed=3)
    batch = src.next_batch()
    assert len(batch) == 6 and all(p.domain == "x" for p in batch)
    assert [p.index for p in batch[::2]] == [p.index for p in batch[1::2]]  # group members are consecutive
    assert len({p.index for p in batch}) == 3  # distinct prompts within a step
    again = PromptSource(pool(), prompts_per_step=3, group_size=2, mixture={"x": 1.0, "y": 0.0}, seed=3)
    assert [p.index for p in again.next_batch()] == [p.index for p in batch]


def test_adaptive_sampler_down_weights_matched_prompts_and_restores_state() -> None:
    src = PromptSource(pool(), prompts_per_step=1, group_size=1, min_weight=0.05, seed=0)
    src.update([0, 1, 2, 3], [1.0, 1.0, 1.0, 0.0])  # prompt 3 already matches the teacher
    assert src.weight(3) == 0.05 and src.weight(0) == 1.0 and src.weight(5) == 1.0  # unseen stays 1
    state = src.state_dict()
    draws = [src.next_batch()[0].index for _ in range(400)]
    assert draws.count(3) < draws.count(0) / 4
    src.load_state_dict(state)
    assert [src.next_batch()[0].index for _ in range(400)] == draws
    uniform = PromptSource(pool(), prompts_per_step=1, group_size=1, sampler="uniform", seed=0)
    uniform.update([3], [0.0])
    assert uniform.weight(3) == 1.0


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "extra": 1}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: unknown keys \['extra'\]"):
        read_examples(path)
    path.write_text('{"prompt": "a", "domain": "d"}\n')
    assert read_examples(path) == [Example("a", "", "d")]
    with pytest.raises(ValueError, match="data.mixture.*no prompts"):
        PromptSource(read_examples(path), prompts_per_step=1, group_size=1, mixture={"zzz": 1.0})
