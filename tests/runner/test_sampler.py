"""The prompt sampler at scale: exact adaptive weights without scanning the pool, plain-data resume, and
a JSONL pool held as arrays."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from opd_fast.runner import data as data_mod
from opd_fast.runner.data import PromptPool, PromptSource
from opd_fast.tasks import Example


def examples(n: int, domains: tuple[str, ...] = ("x",)) -> list[Example]:
    return [Example(f"p{i}", f"r{i}" if i % 2 else "", domains[i % len(domains)]) for i in range(n)]


def draw_frequencies(src: PromptSource, draws: int) -> np.ndarray:
    counts = np.zeros(len(src.pool))
    for _ in range(draws):
        counts[src.next_batch()[0].index] += 1
    return counts / draws


@pytest.mark.parametrize("max_proposals", [64, 1])  # 1: nearly every draw takes the exact fallback
def test_adaptive_draws_follow_the_weights(monkeypatch: pytest.MonkeyPatch, max_proposals: int) -> None:
    monkeypatch.setattr(data_mod, "MAX_PROPOSALS", max_proposals)
    src = PromptSource(examples(6), prompts_per_step=1, group_size=1, min_weight=0.1, seed=1)
    src.update([0, 1, 2, 3], [2.0, 1.0, 0.1, 0.0])  # weights 1, 0.5, 0.1 (floor), 0.1; unseen 4, 5: 1
    weights = np.array([src.weight(i) for i in range(6)])
    np.testing.assert_allclose(weights, [1.0, 0.5, 0.1, 0.1, 1.0, 1.0])
    freq = draw_frequencies(src, 6000)
    np.testing.assert_allclose(freq, weights / weights.sum(), atol=0.02)


def test_no_repeats_within_a_step_until_the_domain_is_exhausted() -> None:
    src = PromptSource(examples(50, ("x", "y")), prompts_per_step=20, group_size=1, seed=0)
    src.update(list(range(50)), [float(i % 5) for i in range(50)])
    for _ in range(20):
        batch = [p.index for p in src.next_batch()]
        assert len(set(batch)) == 20
    tiny = PromptSource(examples(3), prompts_per_step=5, group_size=1, sampler="uniform", seed=0)
    batch = [p.index for p in tiny.next_batch()]
    assert set(batch[:3]) == {0, 1, 2} and len(batch) == 5  # all three first, then repeats


def test_domain_maximum_follows_decreasing_feedback() -> None:
    src = PromptSource(examples(4), prompts_per_step=1, group_size=1, ema=0.0, min_weight=0.01, seed=0)
    src.update([0, 1], [4.0, 1.0])
    assert src.weight(1) == 0.25
    for value in (2.0, 0.5, 0.1):  # the maximum's own prompt decreases: the next largest takes over
        src.update([0], [value])
        assert src.weight(0) == pytest.approx(min(1.0, value / 1.0))
        assert src.weight(1) == pytest.approx(1.0 / max(value, 1.0))
    for step in range(500):  # many updates: stale heap entries stay bounded
        src.update([step % 4], [float(step % 7)])
    assert len(src._top["x"]) <= 64 + 2 * 4


def test_state_is_plain_data_and_resume_is_exact(tmp_path: Path) -> None:
    kwargs = {"prompts_per_step": 8, "group_size": 2, "seed": 5}
    src = PromptSource(examples(1000, ("a", "b")), **kwargs)
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = [p.index for p in src.next_batch()]
        src.update(idx, rng.random(len(idx)).tolist())
    torch.save(src.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)  # tensors, ints and tuples only
    expected = []
    for _ in range(5):
        idx = [p.index for p in src.next_batch()]
        expected.append(idx)
        src.update(idx, [0.5] * len(idx))
    again = PromptSource(examples(1000, ("a", "b")), **kwargs)
    again.load_state_dict(state)
    for want in expected:
        idx = [p.index for p in again.next_batch()]
        assert idx == want
        again.update(idx, [0.5] * len(idx))


def test_jsonl_pool_keeps_arrays_and_parses_drawn_lines(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    rows = [{"prompt": f"q{i}", "domain": "d1" if i % 3 else "d0", **({"reference": f"a{i}"} if i % 4 else {})}
            for i in range(5000)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(10, "   ")  # blank lines are skipped; line numbers still count them
    path.write_text("\n".join(lines))  # no trailing newline
    pool = PromptPool.from_jsonl(path)
    assert len(pool) == 5000 and pool.domain_names == ["d0", "d1"]
    assert isinstance(pool.domain_codes, np.ndarray) and isinstance(pool.has_reference, np.ndarray)
    assert pool.missing_references == sum(1 for i in range(5000) if i % 4 == 0)
    for i in (0, 9, 10, 4999):
        assert pool[i] == Example(f"q{i}", f"a{i}" if i % 4 else "", "d1" if i % 3 else "d0")
    src = PromptSource(pool, prompts_per_step=4, group_size=1, mixture={"d0": 1.0}, seed=0)
    assert {p.domain for p in src.next_batch()} == {"d0"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: 'prompt' must be a string or a list of .* messages"):
        PromptPool.from_jsonl(bad)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no prompts"):
        PromptPool.from_jsonl(tmp_path / "empty.jsonl")


def test_checkpoints_with_the_former_ema_dict_still_load() -> None:
    src = PromptSource(examples(10), prompts_per_step=2, group_size=1, seed=0)
    src.update([1, 4], [2.0, 0.5])
    old_format = {"ema": {"1": 2.0, "4": 0.5}, "rng": src.rng.getstate()}
    again = PromptSource(examples(10), prompts_per_step=2, group_size=1, seed=9)
    again.load_state_dict(old_format)
    assert [again.weight(i) for i in range(10)] == [src.weight(i) for i in range(10)]
    assert [p.index for p in again.next_batch()] == [p.index for p in src.next_batch()]
