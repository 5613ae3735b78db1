"""User-facing errors.

Anything a user can cause (a bad file, a bad flag, a missing data set) raises a subclass of
:class:`DifflabError`. The CLI prints its message on one line and exits with code 2; a
traceback is shown only with ``--debug``. Library code never calls ``sys.exit``.
"""

from __future__ import annotations


class DifflabError(Exception):
    """A problem with the user's input: printed as one line, CLI exit code 2."""


class DataError(DifflabError):
    """A data set cannot be found or read (missing file, wrong magic number, truncated...)."""


class ConfigError(DifflabError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


class CheckpointError(DifflabError):
    """A checkpoint folder or weights file is missing, malformed or does not match its model."""


def a_or_an(noun: str) -> str:
    """``noun`` with its indefinite article, for messages: "an Autoencoder", "a VAE"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"
