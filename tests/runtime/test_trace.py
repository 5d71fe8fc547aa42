"""Traces: the runtime's timeline shows the CPU worker busy while the main thread works; the
simulator writes the same format. (A failing CPU expert: tests/test_generate.py.)"""

import json

import torch

import fiddlerc


def load_trace(path):
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    slices = [(names[e["tid"]], e["name"], e["ts"], e["ts"] + e["dur"]) for e in events if e["ph"] == "X"]
    return names, slices


def test_run_trace_shows_cpu_experts_under_main_thread_work(model_dirs, tmp_path):
    src = model_dirs("mixtral")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=128, fast_experts=4)  # 2 of 4 per layer
    ids = torch.randint(3, 100, (4, 48), generator=torch.Generator().manual_seed(0))
    # the reference kernels: the CPU tier on the worker thread, as beside a GPU (a CPU-only "auto" load runs a
    # token's experts in one call on the main thread instead)
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference", trace=tmp_path / "trace.json") as model:
        model.generate(ids, max_new_tokens=4, ignore_eos=True)
    names, slices = load_trace(tmp_path / "trace.json")
    assert set(names.values()) == {"fast device (main thread)", "CPU worker", "copies"}
    main = [s for s in slices if s[0] == "fast device (main thread)" and (" fast" in s[1] or "attention" in s[1])]
    worker = [s for s in slices if s[0] == "CPU worker"]
    assert worker and main and all(s[1].startswith("L") and " E" in s[1] for s in worker)  # named by layer and expert
    overlapping = [(w, m) for w in worker for m in main if w[2] < m[3] and m[2] < w[3]]
    assert overlapping, "no CPU-worker slice runs while the main thread computes"
    assert {s[1] for s in slices} >= {"L0 attention", "L0 moe", "L0 combine", "L0 to host"}


def test_simulated_trace_has_the_same_format(tmp_path):
    from fiddlerc.cli import main

    config = __import__("pathlib").Path(__file__).parents[1] / "data" / "mixtral-8x7b-config.json"
    args = [
        "plan",
        str(config),
        "--gpu-memory",
        "24GiB",
        "--context",
        "512",
        "--prompt-tokens",
        "8",
        "--output-tokens",
        "3",
    ]
    assert main([*args, "--trace", str(tmp_path / "new" / "sim.json")]) == 0  # its folder made
    names, slices = load_trace(tmp_path / "new" / "sim.json")
    assert "CPU worker (predicted)" in names.values() and "fast device (predicted)" in names.values()
    cpu = [s for s in slices if s[0] == "CPU worker (predicted)"]
    gpu = [s for s in slices if s[0] == "fast device (predicted)" and " E" in s[1]]
    assert any(c[2] < g[3] and g[2] < c[3] for c in cpu for g in gpu)  # the plan overlaps the tiers
    for track in names.values():  # each resource runs one task at a time
        mine = sorted((a, b) for t, _, a, b in slices if t == track)
        assert all(b0 <= a1 + 0.002 for (_, b0), (a1, _) in zip(mine, mine[1:], strict=False))  # us, rounded
