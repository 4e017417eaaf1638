"""One exception type for everything a user can cause.

The CLI turns a QwqqError into one line on stderr and a non-zero exit; anything
else is a bug and keeps its traceback (shown in full with --debug).
"""

from __future__ import annotations

from pathlib import Path


class QwqqError(Exception):
    """An error the user can act on: bad input, missing file, no space, ..."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class SourceError(QwqqError):
    """The model source (folder, hub id, safetensors, config) is unusable."""


class UnsupportedError(QwqqError):
    """The model or option is valid but not something qwqq supports."""


class OutputError(QwqqError):
    """The output cannot be written (exists, unwritable, disk full, locked)."""

    exit_code = 3
