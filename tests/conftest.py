"""Shared fixtures. TRITON_INTERPRET must be set before any module defines a Triton kernel."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture
def seed() -> int:
    """Seed torch's RNG for a reproducible test and return the seed."""
    torch.manual_seed(1234)
    return 1234
