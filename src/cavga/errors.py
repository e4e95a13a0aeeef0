"""Errors that the command line turns into one clear message instead of a traceback, and the
one-line warnings of work that goes on without a file."""

import importlib
import sys
from types import ModuleType


class CavgaError(Exception):
    """Base class for every error a user can fix (bad data, a wrong run folder, bad options)."""


class DataError(CavgaError):
    """A dataset folder, image or mask is missing or malformed; the message names the file."""


class RunError(CavgaError):
    """A run folder or checkpoint is missing, corrupt, or belongs to another model or setting."""


def warn(message: str) -> None:
    """One line on stderr for something skipped or changed while the work goes on."""
    print(f"cavga: warning: {message}", file=sys.stderr)


def reason(e: Exception) -> str:
    """One line for an error that costs one image its result: a user's error as it is, anything
    else named as unexpected with its type."""
    return str(e) if isinstance(e, CavgaError) else f"unexpected error: {type(e).__name__}: {e}"


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional dependency of `what`, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CavgaError(f"{what} needs the optional package {module!r}: pip install 'cavga[{extra}]'") from e
