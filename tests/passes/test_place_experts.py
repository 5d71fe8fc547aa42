"""place_experts: Before (a plan with memory accounted) -> run -> Expected placement."""

from dataclasses import replace

import pytest

from fiddlerc.compiler.options import CompileOptions
from fiddlerc.errors import BudgetError
from fiddlerc.passes.place_experts import place_experts
from fiddlerc.plan import Memory, ModelInfo, MoeLayer, Plan, Target
from fiddlerc.plan_file import verify_plan


class _NoGraph:
    """place_experts reads the plan only: no graph."""

    class graph:  # noqa: N801
        nodes = ()


def before(
    budget: int, dense: int = 400, kv: int = 100, experts: int = 4, layers=(0, 1), per_expert: int = 100
) -> Plan:
    return Plan(
        model=ModelInfo("MixtralForCausalLM", "mixtral", "float32", 2, "0" * 64),
        target=Target("cuda:0", budget, 64, 1, None),
        moe_layers=tuple(
            MoeLayer(
                i,
                f"model.layers.{i}.mlp",
                f"model.layers.{i}.mlp.experts",
                "experts-interface",
                "softmax top-k",
                experts,
                2,
                per_expert,
                0,
            )
            for i in layers
        ),
        memory=Memory(budget, dense, kv),
    )


def run(plan: Plan, fast_experts=None) -> Plan:
    out = place_experts(_NoGraph, plan.with_(target=replace(plan.target, fast_experts=fast_experts)), CompileOptions())
    verify_plan(out, complete=True)
    return out


def test_fills_budget_exactly():
    plan = run(before(budget=400 + 100 + 300))  # room for exactly 3 experts
    fast = [(e.layer, e.expert) for e in plan.experts if e.device == "cuda:0"]
    assert fast == [(0, 0), (0, 1), (1, 0)]  # uniform use: round-robin over layers
    assert plan.memory.expert_bytes == {"cuda:0": 300, "cpu": 500}
    assert plan.memory.free_bytes == 0


def test_one_byte_short_leaves_the_expert_on_cpu():
    plan = run(before(budget=400 + 100 + 299))
    assert sum(e.device == "cuda:0" for e in plan.experts) == 2
    assert plan.memory.free_bytes == 99


def test_all_and_none():
    assert {e.device for e in run(before(budget=10_000)).experts} == {"cuda:0"}
    assert {e.device for e in run(before(budget=500)).experts} == {"cpu"}


def test_every_expert_has_a_reason():
    plan = run(before(budget=700))
    for e in plan.experts:
        assert ("fits" in e.reason) == (e.device == "cuda:0")
        assert "over budget" in e.reason or e.device == "cuda:0"


def test_fast_experts_override():
    plan = run(before(budget=10_000), fast_experts=1)
    assert [(e.layer, e.expert) for e in plan.experts if e.device == "cuda:0"] == [(0, 0)]
    assert all("--fast-experts 1" in e.reason for e in plan.experts)


def test_fast_experts_checked_against_budget():
    with pytest.raises(BudgetError, match="--fast-experts 4 needs"):
        run(before(budget=400 + 100 + 300), fast_experts=4)
    with pytest.raises(BudgetError, match="more experts than the model has"):
        run(before(budget=10_000), fast_experts=9)


@pytest.mark.parametrize("n_fit", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("profile_name", ["quadro-rtx6000-skylake48", "cpu-2core"])
def test_placement_is_a_brute_force_optimum_of_predicted_time(n_fit, profile_name):
    """With uniform use, no placement of the same number of GPU experts predicts a faster decode."""
    from dataclasses import replace
    from itertools import combinations

    from fiddlerc.compiler.cost import predict_decode
    from fiddlerc.hardware import load_profile
    from fiddlerc.plan import CPU

    profile = load_profile(profile_name)
    budget = 400 + 100 + n_fit * 100
    ours = run(before(budget=budget))
    best = predict_decode(ours, profile).ms_per_token
    slots = [(layer, e) for layer in (0, 1) for e in range(4)]
    for chosen in combinations(slots, n_fit):
        experts = tuple(replace(p, device="cuda:0" if (p.layer, p.expert) in chosen else CPU) for p in ours.experts)
        other = ours.with_(experts=experts)
        assert predict_decode(other, profile).ms_per_token >= best - 1e-9


def test_priced_placement_states_the_saving_and_the_host_memory():
    from fiddlerc.hardware import load_profile

    gpu_box = load_profile("quadro-rtx6000-skylake48")
    plan = place_experts(_NoGraph, before(budget=700), CompileOptions(hardware=gpu_box, cpu_memory_bytes=250))
    fast = [e for e in plan.experts if e.device == "cuda:0"]
    assert len(fast) == 2 and all("ms/token on the fast tier" in e.reason for e in plan.experts)
    # host memory holds the cpu-tier experts: 6 x 100 B against 250 B
    assert (plan.memory.host_bytes, plan.memory.host_budget_bytes) == (600, 250)
    assert plan.memory.paged_fraction == pytest.approx(1 - 250 / 600)
    # a CPU-only target keeps everything in host memory; the budget defaults to the profile's memory
    cpu_box = load_profile("cpu-2core")
    plan = place_experts(_NoGraph, before(budget=700), CompileOptions(hardware=cpu_box))
    assert plan.memory.host_bytes == 400 + 100 + 8 * 100
    assert plan.memory.host_budget_bytes == cpu_box.cpu.memory_bytes and plan.memory.paged_fraction == 0
