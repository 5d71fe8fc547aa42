"""Timelines in the Chrome / Perfetto trace format: one track per resource, one slice per op.

The runtime records what each thread does (`Tracer.span`): the main thread drives the fast device
(attention, resident and fetched experts, the routing sync, the combine), the CPU worker runs the
cpu-tier experts, and activation and weight copies get a track of their own. The simulator writes
the same format for a predicted schedule (`fiddlerc.compiler.simulate.Simulation.trace_json`), so measured
and predicted timelines open side by side in https://ui.perfetto.dev or chrome://tracing.

Times are host wall-clock. On a CUDA device, slices on the main track measure issue time unless the
work synchronises (the routing sync does, once per MoE layer).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fiddlerc.chrome_trace import chrome_trace

MAIN, WORKER, COPIES = "fast device (main thread)", "CPU worker", "copies"


class Tracer:
    """Collects slices from any thread; `save` writes them as a Chrome trace."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter_ns()
        self._lock = threading.Lock()
        self.events: list[tuple[str, str, float, float, dict]] = []

    def now_us(self) -> float:
        return (time.perf_counter_ns() - self._t0) / 1000

    def add(self, name: str, track: str, start_us: float, end_us: float, **args) -> None:
        with self._lock:
            self.events.append((name, track, start_us, end_us - start_us, args))

    @contextmanager
    def span(self, name: str, track: str, **args) -> Iterator[None]:
        start = self.now_us()
        try:
            yield
        finally:
            self.add(name, track, start, self.now_us(), **args)

    def slices(self, track: str) -> list[tuple[str, float, float]]:
        """(name, start us, end us) of one track, in time order."""
        with self._lock:
            return sorted((n, s, s + d) for n, t, s, d, _ in self.events if t == track)

    def to_json(self) -> str:
        with self._lock:
            events = sorted(self.events, key=lambda e: (e[2], e[1]))
        return chrome_trace(events, [MAIN, WORKER, COPIES], "fiddlerc run")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path
