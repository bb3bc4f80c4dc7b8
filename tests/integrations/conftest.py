"""Tiny HF student and teacher (different architectures and widths, one tokenizer) and a padded batch."""

from __future__ import annotations

import pytest
import torch

from opd_fast.models.tiny import char_tokenizer, tiny_causal_lm


@pytest.fixture(scope="package")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="package")
def models(tokenizer):
    student = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    teacher = tiny_causal_lm(tokenizer, arch="qwen2", hidden_size=48, num_layers=1, num_heads=2, seed=1)
    return student.double(), teacher.double().requires_grad_(False)


@pytest.fixture(scope="package")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded prompts + completions: labels hide the prompt (first 3 tokens) and the padding."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, len(tokenizer), (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 5:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, tokenizer.pad_token_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
