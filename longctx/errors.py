"""User-facing errors.

A :class:`LongctxError` is a mistake the user can fix (a missing file, an unknown key, a checkpoint that does not
match). The CLI prints its message as one line on stderr and exits with its ``exit_code``; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class LongctxError(Exception):
    """A problem with the user's input, stated in one line that names the thing and the fix."""

    exit_code = 2


class ConfigError(LongctxError):
    """An invalid configuration: unknown key, wrong type, value out of range."""


class DataError(LongctxError):
    """Missing, empty, unreadable or too short input data."""


class CheckpointError(LongctxError):
    """A checkpoint or saved state that is missing, incomplete, corrupt or made for another model."""
