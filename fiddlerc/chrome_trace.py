"""The Chrome / Perfetto trace format (open in https://ui.perfetto.dev or chrome://tracing): the runtime's
recorded timelines (fiddlerc.runtime.trace) and the simulator's predicted ones (fiddlerc.compiler.simulate)
both write it, so measured and predicted timelines open side by side."""

from __future__ import annotations

import json


def chrome_trace(events: list[tuple[str, str, float, float, dict]], tracks: list[str], process: str) -> str:
    """Trace JSON from (name, track, start us, duration us, args) slices, tracks in the given order."""
    tid = {name: i + 1 for i, name in enumerate(tracks)}
    out: list[dict] = [{"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": process}}]
    for name, i in tid.items():
        out.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": name}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": i, "args": {"sort_index": i}})
    for name, track, start, dur, args in events:
        out.append(
            {
                "name": name,
                "ph": "X",
                "pid": 1,
                "tid": tid[track],
                "ts": round(start, 3),
                "dur": round(dur, 3),
                "args": args,
            }  # fmt: skip
        )
    return json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}, indent=None) + "\n"
