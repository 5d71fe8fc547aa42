"""The CPU worker: one background thread that runs the cpu-tier experts.

torch ops release the GIL, so the worker computes while the main thread drives the fast device.
The main thread waits on a job's lock, never busy-polls (a spinning main thread slows the worker a
lot). An exception in the worker reaches the caller through `Job.result()` with its traceback.

A hand-off costs what it costs in Python, and at decode it happens once per MoE layer per token:
the thread is fed through a `queue.SimpleQueue` and each job signals its end by releasing one lock,
rather than through `concurrent.futures`, whose `Future` and condition variable per call cost a
visible share of a decode step's CPU-expert time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch


class Job:
    """One call handed to the worker; `result()` waits for it and returns its value or raises its error."""

    __slots__ = ("_args", "_done", "_error", "_fn", "_value")

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self._fn, self._args = fn, args
        self._value: Any = None
        self._error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released by the worker when the call ends

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
            self._error = e
        finally:
            self._fn = self._args = None
            self._done.release()

    def result(self) -> Any:
        with self._done:  # waits until the worker released it
            pass
        if self._error is not None:
            raise self._error
        return self._value


class CpuWorker:
    def __init__(self, num_threads: int | None = None) -> None:
        self._threads = num_threads or torch.get_num_threads()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="fiddlerc-cpu", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # A new thread inherits the intra-op thread count only sometimes: set it inside the worker.
        torch.set_num_threads(self._threads)
        torch.set_grad_enabled(False)
        while (job := self._jobs.get()) is not None:
            job._run()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        if self._closed:
            raise RuntimeError("the CPU worker was closed: load the model again")
        job = Job(fn, args)
        self._jobs.put(job)
        return job

    def close(self) -> None:
        """Lets the jobs already handed over finish, then ends the thread."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()


class InlineWorker:
    """A CpuWorker that runs each job at once on the calling thread. For a CPU-only machine whose CPU-tier
    kernels use every core themselves (the quantized experts, OpenMP): there a hand-off buys no overlap,
    the calling thread would only wait, and a second thread driving its own OpenMP team would contend
    for the cores with the caller's."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        job = Job(fn, args)
        job._run()
        return job

    def close(self) -> None:
        pass
