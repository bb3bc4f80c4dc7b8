"""Shared fixtures. TRITON_INTERPRET must be set before any module defines a Triton kernel, and
HF_HUB_OFFLINE before huggingface_hub is imported (it reads it once): no test may download a model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture
def seed() -> int:
    """Seed torch's RNG for a reproducible test and return the seed."""
    torch.manual_seed(1234)
    return 1234
