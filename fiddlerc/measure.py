"""Measuring this machine: the one timer, the one measure-and-cache helper, and how much weight a
measurement cycles through so that it reads from memory, not from a cache.

Calibration (fiddlerc.tools.calibrate), the load-time kernel choices (fiddlerc.runtime.kernels) and
the benchmark (fiddlerc.tools.bench) all time with `median_seconds` and cache with `cached`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from fiddlerc.files import write_atomic
from fiddlerc.hardware import cache_dir, cpu_features, cpu_name

T = TypeVar("T")

# Measured weights cycle through this much memory: more than the last-level cache a core can use
# (AMD's 3D V-cache parts have 96 MiB per CCD), so each call streams its weight from DRAM as a
# decode step does. Reusing one expert instead would time the cache, and flatter the CPU.
POOL_BYTES = 256 * 2**20


def pool_size(item_bytes: int, minimum: int = 4) -> int:
    """How many items of `item_bytes` a measurement cycles through: at least `POOL_BYTES` of them."""
    return max(minimum, -(-POOL_BYTES // max(1, item_bytes)))


def seconds(
    run: Callable[[], object], rounds: int, *, warmup: int = 1, sync: Callable[[], None] | None = None
) -> list[float]:
    """Wall-clock seconds of each of `rounds` calls of `run()`, after `warmup` untimed calls; `sync`
    (a CUDA synchronize) is called before each call starts and before it is read."""
    for _ in range(warmup):
        run()
    out = []
    for _ in range(rounds):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        run()
        if sync is not None:
            sync()
        out.append(time.perf_counter() - t0)
    return out


def median_seconds(
    run: Callable[[], object], rounds: int, *, warmup: int = 1, sync: Callable[[], None] | None = None
) -> float:
    """The median of `seconds(...)`: robust to the odd slow call of a shared machine."""
    return statistics.median(seconds(run, rounds, warmup=warmup, sync=sync))


def cache_path(kind: str, key: list) -> Path:
    """The cache file of one measurement: `kind` names it, `key` says what was measured and how; the
    machine's host name, CPU model, kernel flags and cores and the torch version are part of the key, so
    another machine or torch never reads it."""
    text = json.dumps([kind, *key, platform.node(), cpu_name(), cpu_features(), torch.__version__])
    return cache_dir() / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"


def cached(path: Path, measure: Callable[[], str], read: Callable[[bytes], T], *, use_cache: bool = True) -> T:
    """`read` of the text cached at `path` (from `cache_path`) when there and readable; else `measure()`,
    stored atomically, then read. A damaged entry (`read` raises ValueError) is measured again."""
    if use_cache and path.is_file():
        try:
            return read(path.read_bytes())
        except (OSError, ValueError):
            pass
    text = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return read(text.encode())
