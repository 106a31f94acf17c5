"""Project exceptions: user-facing errors that the CLI prints as one line (``--debug`` for the traceback)."""

from __future__ import annotations


class TsdError(Exception):
    """Base of every error a user can fix (bad input, bad config, missing file)."""


class InputError(TsdError):
    """An input file is unusable as a whole (missing, unreadable, wrong layout)."""


class ConfigError(TsdError):
    """A configuration file or override is invalid; the message names the key's path."""
