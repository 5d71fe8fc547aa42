"""plan_execution: the per-expert fetch thresholds, by hand and as a compiled plan stores them."""

from fiddlerc.compiler.cost import CostModel
from fiddlerc.hardware import CpuSpec, HardwareProfile
from tests.compiler.test_cost import CPU_, GPU, profile


def test_fetch_thresholds_by_hand_and_in_the_plan(model_dirs, tmp_path):
    import fiddlerc
    from fiddlerc.passes.plan_execution import fetch_thresholds

    m = CostModel(profile())  # copy 1e8 B at 10 GB/s = 10 ms; GPU 0.6 ms; CPU 1 ms: compute-bound CPU needed
    assert fetch_thresholds(m, 0, 1, 10**8, 2) == [None]  # the CPU never gets slower than a copy here
    # CPU at 10 GFLOP/s: 1e8 flops per token = 10 ms per token; a fetch costs 10 + 0.6 ms
    slow_cpu = CostModel(HardwareProfile("t", "", CpuSpec("c", 1, 100.0, 0.01, 0.0, 1), GPU, {}))
    assert fetch_thresholds(slow_cpu, 0, 1, 10**8, 2) == [2]  # 10.6 < 20 ms from 2 tokens
    # Two cpu-tier experts: the first is fetched from 2 tokens, the second only from 3 (both fetched:
    # GPU 21.2 ms, which must beat max(10.6, 10n)). A rule comparing each expert's own times would
    # say [2, 2]: at 2 tokens the layer would take 21.2 ms instead of 20. At 1 token the makespan
    # alone would fetch one (max(10.6, 10) < 20), but the lookup cannot tell that call from a decode
    # step whose only CPU expert it is, where the fetch loses (10.6 > 10): a call is fetched only
    # where the fetch also beats that expert on the CPU.
    assert fetch_thresholds(slow_cpu, 0, 2, 10**8, 2) == [2, 3]
    # A GPU busy with 20 resident experts (0.6 ms each = 12 ms) fetches later: max(22.6, 0) < 10n from 3
    assert fetch_thresholds(slow_cpu, 20, 1, 10**8, 2) == [3]
    cpu_only = CostModel(HardwareProfile("c", "", CPU_, None, {}))
    assert fetch_thresholds(cpu_only, 0, 3, 10**8, 2) == [None] * 3  # nothing to fetch to
    art = fiddlerc.compile(
        model_dirs("mixtral"),
        tmp_path / "out",
        gpu_memory="1GiB",
        context=64,
        fast_experts=3,
        hardware="quadro-rtx6000-skylake48",
    )
    from fiddlerc.hardware import load_profile

    model = CostModel(load_profile("quadro-rtx6000-skylake48"))
    for ml in art.plan.moe_layers:  # the plan holds the policy's table, cpu-tier experts in expert order
        mine = sorted((e for e in art.plan.experts if e.layer == ml.layer), key=lambda e: e.expert)
        cpu = [e.fetch_min_tokens for e in mine if e.device == "cpu"]
        assert cpu == fetch_thresholds(model, len(mine) - len(cpu), len(cpu), ml.bytes_per_expert, 4)
        assert all(e.fetch_min_tokens is None for e in mine if e.device != "cpu")
    assert any(e.fetch_min_tokens is not None for e in art.plan.experts)
