"""The Chrome/Perfetto trace format both the runtime and the simulator write."""

import json

from fiddlerc.chrome_trace import chrome_trace


def test_slices_land_on_their_tracks_in_order():
    doc = json.loads(chrome_trace([("E3 cpu", "worker", 10.0, 2.5, {"tokens": 1})], ["main", "worker"], "run"))
    names = {e["args"]["name"]: e["tid"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"main": 1, "worker": 2}
    (slice_,) = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert (slice_["name"], slice_["tid"], slice_["ts"], slice_["dur"]) == ("E3 cpu", 2, 10.0, 2.5)
