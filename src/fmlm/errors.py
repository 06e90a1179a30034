"""User-facing errors.

Anything a user can fix (bad config key, missing checkpoint, corrupt file,
unknown dataset, ...) raises :class:`FmlmError`. The CLI turns it into one line
on stderr and exit code 2; library callers get an ordinary exception.
"""


class FmlmError(Exception):
    """An error caused by bad input, reported to the user as one line."""


class ConfigError(FmlmError):
    """Unknown preset or key, or a value of the wrong type."""


class CheckpointError(FmlmError):
    """Missing, partial, corrupt or mismatched checkpoint."""


class DataError(FmlmError):
    """Empty, unreadable or non-UTF-8 corpus; unknown dataset; bad tokenizer."""
