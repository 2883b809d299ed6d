"""Checks of an output path a command will write, made before the expensive work (loading a model,
running a benchmark) so that a path that cannot be written fails at once, in one line.

`check_output_path` creates nothing: it finds the nearest existing folder above the path and checks
that it is a folder this user can write into, and that the path itself is not a file where a folder is
expected (or the reverse). `write_error` turns the `OSError` of a write that still fails (full disk,
a race) into the same one-line `ConfigError`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from llama2.errors import ConfigError


def check_output_path(path: Path | str, *, folder: bool, what: str) -> Path:
    """Refuse an output path that cannot be created or written, without creating anything.

    Args:
        path: the file or folder to be written (it may not exist yet, nor its parents).
        folder: True when `path` is a folder to write into, False when it is a file to write.
        what: how the user named it, for the message (e.g. "--out").

    Returns:
        `path` as a `Path`.

    Raises:
        ConfigError: a regular file where a folder is needed (the path, or one of its parents), a folder
            where a file is expected, or a nearest existing folder this user cannot write into.
    """
    out = Path(path)
    try:
        _check(out, folder, what)
    except OSError as e:  # e.g. a parent folder this user cannot search
        raise write_error(what, out, e) from None
    return out


def _check(out: Path, folder: bool, what: str) -> None:
    expected = "a folder that can be created and written" if folder else "a file path in a writable folder"
    if out.is_dir() and not folder:
        raise ConfigError(f"cannot write {what} {out}: it is a folder; expected {expected}")
    if out.exists() and not out.is_dir() and folder:
        raise ConfigError(f"cannot write {what} {out}: it exists and is not a folder; expected {expected}")
    existing = out if out.is_dir() else out.parent
    while not existing.exists() and existing != existing.parent:  # `exists` is False under a file too
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"cannot write {what} {out}: {existing} is a file, not a folder; expected {expected}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot write {what} {out}: folder {existing} is not writable; expected {expected}"
        )


def write_error(what: str, path: Path | str, e: OSError) -> ConfigError:
    """A one-line error for a write of `path` that failed with `e` (to raise `from None`)."""
    in_the_way = isinstance(e, FileExistsError | NotADirectoryError) or e.errno == errno.ENOTDIR
    reason = "a file is in the way" if in_the_way else (e.strerror or str(e))
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return ConfigError(f"cannot write {what} {path}: {reason}{where}")
