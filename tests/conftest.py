"""Shared fixtures. Tiny model builders live in tests/tiny_models.py (import them from there)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
