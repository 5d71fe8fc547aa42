"""Writing a file so that a reader never sees half of it: the one atomic write every output uses."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from fiddlerc.errors import OptionError


@contextmanager
def open_atomic(path: str | Path, binary: bool = False) -> Iterator[IO]:
    """A file to write `path` through: a temporary file in the same folder, renamed over `path` when the
    block ends without an error. A crash or Ctrl-C leaves the old file or the new one, never a truncated
    one. Text is UTF-8 with `\\n` newlines."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            yield fh
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; a file written plainly gets this
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def output_file(path: str | Path, what: str) -> Path:
    """`path` made ready for a file the user asked for (its missing parent folders created), checked before
    the work that fills it: an existing folder, or a parent that cannot be created, is an OptionError."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"{what} {path} is a folder: give the name of a file (in it, or elsewhere)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"cannot create the folder of {what} {path}: {e.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise OptionError(f"cannot write {what} {path}: its folder is not writable")
    return path


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (see `open_atomic`)."""
    with open_atomic(path) as fh:
        fh.write(text)
