"""How much of the CPU worker's time ran under main-thread work, from a trace.

    python examples/trace_overlap.py TRACE.json

Reads a trace written by `fiddlerc run --trace` / `load(..., trace=...)` (or by `fiddlerc plan
--trace` for a predicted schedule) and prints each track's busy time and the overlap fraction:
the share of CPU-worker busy time during which the fast device's track was also computing
(attention or experts; waiting for the worker does not count).
"""

from __future__ import annotations

import json
import sys


def busy_intervals(slices: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(slices):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    total, j = 0.0, 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            total += max(0.0, min(b, ys[k][1]) - max(a, ys[k][0]))
            k += 1
    return total


def main() -> None:
    events = json.load(open(sys.argv[1]))["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    tracks: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e["ph"] != "X":
            continue
        track = names[e["tid"]]
        if track.startswith("fast device") and not (
            " E" in e["name"] or "attention" in e["name"] or "dense" in e["name"]
        ):
            continue  # the MoE layer's outer slice, routing, waiting, combine: not compute of the fast tier
        tracks.setdefault(track, []).append((e["ts"], e["ts"] + e["dur"]))
    merged = {t: busy_intervals(s) for t, s in tracks.items()}
    for t, iv in merged.items():
        print(f"{t}: busy {sum(b - a for a, b in iv) / 1000:.1f} ms")
    worker = next((iv for t, iv in merged.items() if t.startswith("CPU worker")), [])
    main_ = next((iv for t, iv in merged.items() if t.startswith("fast device")), [])
    busy = sum(b - a for a, b in worker)
    print(
        f"overlap: {overlap(worker, main_) / busy:.1%} of the CPU worker's busy time ran under fast-device work"
        if busy
        else "no CPU work"
    )


if __name__ == "__main__":
    main()
