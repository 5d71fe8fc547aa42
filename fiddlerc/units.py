"""Sizes and dtypes as users write them: `24GiB`, `512MiB`, `bfloat16`; parsed and printed here only."""

from __future__ import annotations

import math
import re

import torch

from fiddlerc.errors import OptionError
from fiddlerc.plan import DTYPE_NAMES

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_MAX_BYTES = 2**60  # 1 EiB: anything larger is a typo, not a machine

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def parse_size(text: str | int) -> int:
    """Parse `24GiB`, `512MiB`, `24GB` (decimal) or a bare byte count into bytes."""
    if isinstance(text, bool):
        raise OptionError(f"invalid size {text!r}: give bytes or a size such as 24GiB")
    if isinstance(text, int):
        if text < 0:
            raise OptionError(f"invalid size {text}: sizes cannot be negative")
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise OptionError(
            f"invalid size {text!r}: use a byte count or a number with one of "
            "B, KB, MB, GB, TB (decimal) or KiB, MiB, GiB, TiB (binary), e.g. 24GiB"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value > _MAX_BYTES:
        raise OptionError(f"invalid size {text!r}: larger than any machine (limit 1 EiB)")
    if unit == "" and "." in m.group(1):
        raise OptionError(f"invalid size {text!r}: a bare byte count must be a whole number")
    return int(value)


def format_size(n_bytes: int) -> str:
    """Human-readable binary size, e.g. 1.50 GiB."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise OptionError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise OptionError(f"unsupported dtype {dtype}: choose one of {', '.join(DTYPES)}")
