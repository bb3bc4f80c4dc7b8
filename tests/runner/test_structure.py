"""The runner's small shared pieces: renamed config keys, the completion-token picker."""

import pytest
import torch

from opd_fast.runner.config import config_from_dict
from opd_fast.runner.data import Prompt
from opd_fast.runner.rollout import RolloutBatch


def test_old_lmbda_key_names_its_replacement() -> None:
    data = {"student": {"path": "s"}, "teachers": {"t": {"path": "t"}}, "data": {"task": "x"},
            "loss": {"lmbda": 0.5}}
    with pytest.raises(ValueError, match=r"'loss\.lmbda' was renamed to 'loss\.off_policy_fraction'"):
        config_from_dict(data)
    data["loss"] = {"off_policy_fraction": 0.5}
    assert config_from_dict(data).loss.off_policy_fraction == 0.5


def test_target_states_and_ids_pick_completion_tokens_row_major() -> None:
    # row 0: prompt [5, 6], completion [7, 8]; row 1: pad, prompt [9], completion [3]
    ids = torch.tensor([[5, 6, 7, 8], [0, 9, 3, 0]])
    completion = torch.tensor([[False, False, True, True], [False, False, True, False]])
    batch = RolloutBatch([Prompt(0, "", "d", None)] * 2, ids, completion.long(), completion,
                         torch.zeros(2, 4), ["", ""], [False, False])
    hidden = torch.arange(8.0).view(2, 4, 1)  # state (b, j) = 4 b + j predicts token j + 1 of row b
    assert batch.target_ids().tolist() == [7, 8, 3]
    assert batch.target_states(hidden).squeeze(1).tolist() == [1.0, 2.0, 5.0]
    rows = torch.tensor([1])
    assert batch.target_ids(rows).tolist() == [3]
    assert batch.target_states(hidden[rows], rows).squeeze(1).tolist() == [5.0]
