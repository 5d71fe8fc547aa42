"""plan.json: writing, reading back, and refusing what does not verify."""

import json

import pytest

from fiddlerc.errors import PlanError
from fiddlerc.plan import (
    ExpertPlacement,
    Memory,
    ModelInfo,
    MoeLayer,
    Plan,
    Target,
)
from fiddlerc.plan_file import plan_from_json, plan_to_json, verify_plan


def small_plan(devices=("cuda:0", "cpu", "cpu", "cuda:0")) -> Plan:
    layer = MoeLayer(
        layer=1,
        block="model.layers.1.mlp",
        experts_module="model.layers.1.mlp.experts",
        layout="experts-interface",
        routing="softmax top-k",
        num_experts=4,
        top_k=2,
        bytes_per_expert=100,
        shared_expert_bytes=0,
    )
    experts = tuple(ExpertPlacement(1, e, d, 100, 0.5, f"rank {e}") for e, d in enumerate(devices))
    sums = {}
    for e in experts:
        sums[e.device] = sums.get(e.device, 0) + e.bytes
    return Plan(
        model=ModelInfo("MixtralForCausalLM", "mixtral", "float32", 2, "0" * 64),
        target=Target("cuda:0", 1000, 64, 1, None),
        fiddlerc_version="0.1.0",
        moe_layers=(layer,),
        memory=Memory(1000, 500, 100, dict(sorted(sums.items(), key=lambda kv: kv[0] == "cpu"))),
        experts=experts,
    )


def test_round_trip_is_lossless():
    plan = small_plan()
    text = plan_to_json(plan)
    assert plan_from_json(text) == plan
    assert plan_to_json(plan_from_json(text)) == text
    data = json.loads(text)
    assert data["format_version"] == 1
    assert {"layer", "expert", "device", "bytes", "reason"} <= set(data["experts"][0])
    assert data["memory"]["free_bytes"] == 1000 - 500 - 100 - 200


def _edit(plan: Plan, fn) -> str:
    data = json.loads(plan_to_json(plan))
    fn(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format_version=2), "format_version"),
        (lambda d: d.update(extra=1), "unknown key"),
        (lambda d: d["experts"][0].update(payload="x"), "unknown key"),
        (lambda d: d["experts"][0].update(reason="ok\n__import__('os')"), "control characters"),
        (lambda d: d["experts"][0].update(device="cuda:0'); import os; ('"), "device"),
        (lambda d: d["moe_layers"][0].update(block="model.layers[1]; import os"), "module path"),
        (lambda d: d["experts"][0].update(bytes=1), "bytes"),
        (lambda d: d["experts"].pop(), "memory.expert_bytes"),
        (lambda d: d["memory"].update(free_bytes=5), "free_bytes"),
        (lambda d: d["experts"][1].update(expert=0), "twice"),
        (lambda d: d.pop("target"), "target"),
        (lambda d: d["experts"][0].update(expected_use=float("nan")), "expected_use"),
        (lambda d: d["target"].update(device="cpu"), "CPU-only target"),  # with a budget and GPU experts
        (lambda d: d["target"].update(budget_note="x" * 500), "budget_note"),
        (lambda d: d["memory"].update(host_budget_given="yes"), "host_budget_given"),
    ],
)
def test_verifier_rejects(edit, message):
    with pytest.raises(PlanError, match=message):
        plan_from_json(_edit(small_plan(), edit))


@pytest.mark.parametrize("text", [b"", b"{", b"[]", b"\xff\xfe", b'{"format_version": 1}', b"null"])
def test_garbage_is_a_plan_error(text):
    with pytest.raises(PlanError):
        plan_from_json(text)


def test_over_budget_plan_is_invalid():
    plan = small_plan(devices=("cuda:0",) * 4)
    bad = plan.with_(memory=Memory(1000, 700, 100, {"cuda:0": 400}))
    with pytest.raises(PlanError, match="exceed the budget"):
        verify_plan(bad)


def test_complete_requires_every_expert():
    plan = small_plan()
    verify_plan(plan, complete=True)
    partial = plan.with_(experts=plan.experts[:3], memory=Memory(1000, 500, 100, {"cuda:0": 100, "cpu": 200}))
    with pytest.raises(PlanError, match="no placement"):
        verify_plan(partial, complete=True)
