"""What several commands share: reading ``PRESET key=value ...``."""

from __future__ import annotations


def split_preset(items: list[str]) -> tuple[str | None, list[str]]:
    """The first positional is a preset or .toml file unless it is a key=value override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items
