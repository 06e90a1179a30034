"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture
def shared_dir() -> Path:
    """The read-only ``../shared`` folder beside the checkout (data slices, tokenizer files)."""
    path = Path(__file__).resolve().parents[1].parent / "shared"
    if not path.is_dir():
        pytest.skip("../shared is not available")
    return path
