"""Several GPUs: --gpu-memory parsing, the min-cost flow against brute force, and a two-GPU plan run on the CPU."""

import itertools
import random

import pytest
import torch

from fiddlerc.compiler.options import parse_gpu_memory
from fiddlerc.errors import BudgetError, OptionError
from fiddlerc.passes.place_experts import assign_by_flow
from fiddlerc.plan import CPU


def test_gpu_memory_parses_one_or_several_gpus():
    assert parse_gpu_memory("24GiB") == [("cuda:0", 24 * 2**30)]
    assert parse_gpu_memory("cuda:0=20GiB, cuda:1=10GiB") == [("cuda:0", 20 * 2**30), ("cuda:1", 10 * 2**30)]
    assert parse_gpu_memory("cuda:1=1MiB,cuda:0=2MiB")[0] == ("cuda:1", 2**20)  # the first named holds the dense part
    for bad, message in [
        ("cuda:0=1GiB,cuda:0=2GiB", "twice"),
        ("gpu0=1GiB", "write cuda:N=SIZE"),
        ("cuda:0=lots", "invalid size"),
    ]:
        with pytest.raises(OptionError, match=message):
            parse_gpu_memory(bad)


def brute_force(scores, slots, limit):
    best = 0.0
    devices = [CPU, *slots]
    for choice in itertools.product(devices, repeat=len(scores)):
        used = {g: choice.count(g) for g in slots}
        if any(used[g] > slots[g] for g in slots) or (limit is not None and sum(used.values()) > limit):
            continue
        best = max(best, sum(s for s, d in zip(scores, choice, strict=True) if d != CPU))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_min_cost_flow_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 7)
    scores = sorted((round(rng.uniform(0, 1), 3) for _ in range(n)), reverse=True)  # rank order, as the pass ranks
    slots = {"cuda:0": rng.randint(0, 2), "cuda:1": rng.randint(0, 3)}
    limit = rng.choice([None, 1, 2, 4])
    got = assign_by_flow(scores, [100] * n, {g: k * 100 + 99 for g, k in slots.items()}, tuple(slots), limit)
    assert all(got.count(g) <= k for g, k in slots.items())
    assert limit is None or sum(d != CPU for d in got) <= limit
    assert sum(s for s, d in zip(scores, got, strict=True) if d != CPU) == pytest.approx(
        brute_force(scores, slots, limit)
    )


def test_flow_breaks_ties_by_rank_and_fills_the_first_gpu_first():
    got = assign_by_flow([1.0] * 5, [10] * 5, {"cuda:0": 20, "cuda:1": 10}, ("cuda:0", "cuda:1"), None)
    assert got == ["cuda:0", "cuda:0", "cuda:1", CPU, CPU]
    with pytest.raises(BudgetError, match="one size"):
        assign_by_flow(
            [1.0, 1.0],
            [10, 20],
            {"cuda:0": 99, "cuda:1": 99},
            ("cuda:0", "cuda:1"),
            None,
        )


def test_a_two_gpu_plan_compiles_reports_and_runs_on_the_cpu(model_dirs, hf_model, tmp_path):
    import fiddlerc
    from fiddlerc.api import plan as plan_model
    from fiddlerc.compiler.report import report_html, report_text

    src = model_dirs("mixtral")
    one = plan_model(src, "1GiB", context=64)
    per_expert = one.moe_layers[0].bytes_per_expert
    first = one.memory.dense_bytes + one.memory.kv_reserve_bytes + 2 * per_expert  # room for 2 experts
    art = fiddlerc.compile(src, tmp_path / "out", f"cuda:0={first},cuda:1={3 * per_expert}", context=64)
    devices = [e.device for e in art.plan.experts]
    assert (devices.count("cuda:0"), devices.count("cuda:1"), devices.count(CPU)) == (2, 3, len(devices) - 5)
    assert art.plan.target.more_gpus == {"cuda:1": 3 * per_expert}
    assert "on cuda:0 [" in art.module_text and "on cuda:1 [" in art.module_text  # the MoE calls' comments
    assert "target cuda:1" in report_text(art.plan) and "cuda:1" in report_html(art.plan)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        got = model(ids)
    with torch.no_grad():
        torch.testing.assert_close(got, hf_model(src)(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
