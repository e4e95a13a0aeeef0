"""Errors that the command line turns into one clear message instead of a traceback, and the
one-line warnings of work that goes on without a file."""

import sys


class CavgaError(Exception):
    """Base class for every error a user can fix (bad data, a wrong run folder, bad options)."""


class DataError(CavgaError):
    """A dataset folder, image or mask is missing or malformed; the message names the file."""


class RunError(CavgaError):
    """A run folder or checkpoint is missing, corrupt, or belongs to another model or setting."""


def warn(message: str) -> None:
    """One line on stderr for something skipped or changed while the work goes on."""
    print(f"cavga: warning: {message}", file=sys.stderr)
