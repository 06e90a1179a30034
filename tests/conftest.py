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


@pytest.fixture
def randn_shapes(monkeypatch) -> list:
    """Records the shape of every ``torch.randn`` call (the draws still happen as usual)."""
    import torch

    shapes: list = []
    real = torch.randn

    def spy(*size, **kw):
        shapes.append(tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else size)
        return real(*size, **kw)

    monkeypatch.setattr(torch, "randn", spy)
    return shapes
