"""Progress bars for the steps that take long on a big model: quantizing experts at compile time, binding
each MoE layer at load, counting routes over documents, the bench's rounds. tqdm's bars, on standard
error, drawn only when it is a terminal (so logs, pipes and CI see none) and not under
FIDDLERC_NO_PROGRESS=1."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def shown() -> bool:
    return sys.stderr.isatty() and os.environ.get("FIDDLERC_NO_PROGRESS", "") in ("", "0")


def progress(items: Iterable[T], what: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """`items`, with a bar that says `what` is being done while they are consumed (none where not `enabled`)."""
    if not enabled or not shown():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=what, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
