"""The CPU worker: one background thread that runs the cpu-tier experts.

torch ops release the GIL, so the worker computes while the main thread drives the fast device.
The main thread waits on futures, never busy-polls (a spinning main thread slows the worker a lot).
An exception in the worker reaches the caller through `Future.result()` with its traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


class CpuWorker:
    def __init__(self, num_threads: int | None = None) -> None:
        threads = num_threads or torch.get_num_threads()
        # A new thread inherits the intra-op thread count only sometimes: set it inside the worker.
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="fiddlerc-cpu",
            initializer=_init_thread,
            initargs=(threads,),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _init_thread(num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    torch.set_grad_enabled(False)
