"""User-facing failures. Each carries the exit code the CLI returns for it.

Exit codes (documented in the README):
    0  success
    1  unexpected internal error (a bug: run with --debug for the traceback)
    2  bad command-line usage (Typer's own code, or UsageError: an option outside its range)
    3  an input file is missing or unreadable
    4  an input file is not usable media (not a video, no video stream, no audio stream, no
       frame with the face ``--face N`` asks for, ...)
    5  the output cannot be written (missing or read-only folder, output equals an input, ...)
    6  a model folder is missing, incomplete or inconsistent
    7  a dependency is not installed or cannot run (ffmpeg, ffprobe, an optional package or
       its weights)
    8  the cache is busy (another run holds its lock) or damaged
    9  dubtool batch: at least one item failed (the others were done)
    130 interrupted (Ctrl-C); the cache stays consistent and the run can be resumed
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path


class DubtoolError(Exception):
    """Base class: a failure the user can act on, shown as one line."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UsageError(DubtoolError):
    """An option outside what it accepts, found before any work."""

    exit_code = 2


class InputNotFound(DubtoolError):
    exit_code = 3


class InvalidMedia(DubtoolError):
    exit_code = 4


class OutputError(DubtoolError):
    exit_code = 5


class ModelError(DubtoolError):
    exit_code = 6


class MissingDependency(DubtoolError):
    exit_code = 7


class CacheError(DubtoolError):
    exit_code = 8


EXIT_BATCH_FAILURES = 9
EXIT_INTERRUPTED = 130


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def disk_full_error(exc: OSError, path: str | Path | None = None) -> OutputError | None:
    """An OSError that means "no space left" (or the file size limit) as an OutputError naming
    the file; None for any other OSError."""
    full = exc.errno in _DISK_FULL or ("requested and" in str(exc) and "written" in str(exc))
    if not full:
        return None
    return OutputError("no space left on the disk while writing (free some space and run "
                       "again: finished stages are kept)", exc.filename or path)


@contextlib.contextmanager
def disk_full_reported(path: str | Path) -> Iterator[None]:
    """Re-raise a "no space left" OSError inside the block as disk_full_error's OutputError
    (naming ``path`` when the OSError names no file); other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        full = disk_full_error(exc, path)
        if full is None:
            raise
        raise full from exc
