"""Writing a file so that a reader never sees half of it: the one atomic write every output uses."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (see `open_atomic`)."""
    with open_atomic(path) as fh:
        fh.write(text)
