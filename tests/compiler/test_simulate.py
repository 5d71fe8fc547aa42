"""The discrete-event simulator, on schedules whose answer is computed by hand.

With top_k equal to the number of experts every token visits every expert, so routing is fixed and
the whole timeline can be worked out on paper. Hand profile (tests/test_cost.py): dense weights
1e9 B read at 1000 GB/s = 1 ms; an expert (1e8 B) takes 0.6 ms on the GPU, 1 ms on the CPU, and
10 ms to copy over PCIe (10 GB/s); a 1000-wide bf16 row (2000 B) takes 0.0002 ms to copy.
"""

from dataclasses import replace
from pathlib import Path

import pytest

from fiddlerc.compiler.cost import CostModel, predict_decode
from fiddlerc.compiler.simulate import Timeline, Workload, simulate
from fiddlerc.errors import OptionError
from fiddlerc.hardware import load_profile
from tests.compiler.test_cost import CPU_, GPU, plan, profile

ROW = 0.0002  # ms to copy one activation row either way


def two_experts(fetch_min_tokens=None):
    p = plan(["cuda:0", "cpu"], top_k=2)
    experts = (p.experts[0], replace(p.experts[1], fetch_min_tokens=fetch_min_tokens))
    return p.with_(model=replace(p.model, hidden_size=1000), experts=experts)


def test_timeline_runs_each_resource_in_issue_order():
    tl = Timeline(cpu_only=False)
    a = tl.add("gpu", 2.0)
    assert tl.add("cpu", 3.0, after=a) == 5.0  # waits for its input
    assert tl.add("gpu", 1.0) == 3.0  # the GPU was free at 2
    assert tl.add("cpu", 1.0) == 6.0  # in order behind the first CPU task, though its input was ready
    assert tl.busy == {"gpu": 3.0, "cpu": 4.0, "h2d": 0.0, "d2h": 0.0}
    shared = Timeline(cpu_only=True)
    shared.add("gpu", 2.0)
    assert shared.add("d2h", 5.0, after=1.0) == 1.0  # one memory: copies are free
    assert shared.add("cpu", 1.0) == 3.0  # the "GPU" work occupied the same cores
    assert shared.busy["cpu"] == 3.0


def test_decode_by_hand():
    # per step: dense 1 ms; then the GPU expert (0.6 ms) while the CPU expert's row goes over (ROW),
    # runs (1 ms) and comes back (ROW): the step ends at 1 + ROW + 1 + ROW
    sim = simulate(two_experts(), profile(), Workload(prompt_tokens=1, output_tokens=3))
    step = 2.0 + 2 * ROW
    assert sim.prefill_ms == pytest.approx(step)
    assert sim.decode_ms == pytest.approx(2 * step)
    assert sim.tokens_per_s == pytest.approx(3 / (3 * step / 1000))
    assert sim.decode_tokens_per_s == pytest.approx(2 / (2 * step / 1000))
    busy = sim.busy_ms
    assert (busy["gpu"], busy["cpu"]) == (pytest.approx(3 * 1.6), pytest.approx(3 * 1.0))
    assert busy["d2h"] == pytest.approx(3 * ROW) and busy["h2d"] == pytest.approx(3 * ROW)


def test_fixed_overheads_land_on_the_fast_device():
    gpu = replace(GPU, layer_overhead_ms=0.25, step_overhead_ms=0.5)
    sim = simulate(two_experts(), profile(gpu), Workload(1, 2))
    assert sim.decode_ms == pytest.approx(0.5 + 0.25 + 2.0 + 2 * ROW)
    assert predict_decode(two_experts(), profile(gpu), position=1).dense_ms == pytest.approx(1.0 + 0.75)


def test_prefill_fetches_from_the_plans_threshold():
    # 4 prompt tokens: each expert gets 4 rows. From 2 rows the CPU-tier expert is fetched:
    # its weights cross PCIe (10 ms from the end of the dense part at 1 ms), then it runs on the GPU
    # after the resident expert: the layer ends at 1 + 10 + 0.6
    fetched = simulate(two_experts(fetch_min_tokens=2), profile(), Workload(4, 1))
    assert fetched.prefill_ms == pytest.approx(11.6)
    assert fetched.busy_ms["h2d"] == pytest.approx(10.0) and fetched.busy_ms["cpu"] == 0.0
    # below the threshold it stays on the CPU: 4 rows over and back
    kept = simulate(two_experts(fetch_min_tokens=5), profile(), Workload(4, 1))
    assert kept.prefill_ms == pytest.approx(1.0 + 4 * ROW + 1.0 + 4 * ROW)


def test_cpu_only_adds_the_tiers_up():
    # dense 1e9 B at the CPU's 100 GB/s = 10 ms, then both experts on the same cores: 1 + 1 ms
    sim = simulate(two_experts(), profile(gpu=None), Workload(1, 2))
    assert sim.decode_ms == pytest.approx(12.0)
    assert sim.busy_ms == {"gpu": 0.0, "cpu": pytest.approx(24.0), "h2d": 0.0, "d2h": 0.0}


def test_batch_and_beams_scale_the_rows():
    one = simulate(two_experts(), profile(), Workload(1, 2))
    four = simulate(two_experts(), profile(), Workload(1, 2, batch=2, beams=2))
    # 4 rows per decode step: the rows' copies grow, the weights are read once
    assert four.decode_ms == pytest.approx(one.decode_ms + 2 * 3 * ROW)
    assert four.tokens_per_s > one.tokens_per_s  # 2 sequences' outputs for about the same time
    with pytest.raises(OptionError, match="at least one"):
        Workload(0, 1)


def test_sampled_routing_agrees_with_the_closed_form_and_is_deterministic():
    """Mixtral-8x7B on the paper's machine: the simulator's mean decode step (sampled routing, with
    activation copies) is within 3 % of the closed-form expectation, and a seed fixes it."""
    from fiddlerc.api import plan as plan_model

    config = Path(__file__).parents[1] / "data" / "mixtral-8x7b-config.json"
    hw = load_profile("quadro-rtx6000-skylake48")
    p = plan_model(config, "24GiB", context=1024, dtype="bfloat16", hardware=hw.name)
    work = Workload(prompt_tokens=400, output_tokens=201)
    sim = simulate(p, hw, work, seed=1)
    assert sim == simulate(p, hw, work, seed=1)
    closed = predict_decode(p, hw, position=500).ms_per_token
    assert sim.decode_ms / 200 == pytest.approx(closed, rel=0.03)
    assert sim.busy_ms["cpu"] > sim.busy_ms["gpu"] / 2  # about 3/4 of the experts sit on the CPU


def test_paging_slows_the_cpu_tier_by_the_paged_share():
    p = two_experts()
    short = p.with_(memory=replace(p.memory, host_bytes=4 * 10**8, host_budget_bytes=10**8))
    assert short.memory.paged_fraction == pytest.approx(0.75)
    disk = replace(CPU_, disk_gbps=1.0)  # 0.75 * 1e8 B at 1 GB/s = 75 ms more per CPU expert call
    hw = profile().__class__("t", "", disk, GPU, {})
    assert CostModel.for_plan(short, hw).cpu_expert_ms(1, 10**8, 2) == pytest.approx(76.0)
    assert simulate(short, hw, Workload(1, 2)).decode_ms == pytest.approx(1 + ROW + 76 + ROW)
    with pytest.raises(OptionError, match="no cpu.disk_gbps"):
        simulate(short, profile(), Workload(1, 2))
