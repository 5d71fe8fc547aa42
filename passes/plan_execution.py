"""plan_execution: for each cpu-tier expert, from how many tokens in one call its weights should be
copied to the GPU and computed there instead of on the CPU (a table lookup at run time).

The per-layer choice minimises the layer's makespan `max(GPU total, CPU total)`, since both tiers
run at once (`fiddlerc.compiler.cost.choose_layer`), not each expert's own time: fetching pays only while
the GPU is less busy than the CPU. For a call size n, the layer is priced as a prefill-like call in
which every expert gets n tokens: the resident experts keep the GPU busy, and the policy picks how
many of the cpu-tier experts to fetch. Expert r (in expert order among the layer's cpu-tier
experts) gets the smallest n at which the policy fetches more than r of them; none on a CPU-only
profile (there is nothing to fetch to) or when fetching it never pays. The lookup is by an
expert's own token count, which does not say how many other experts the call keeps busy, so a
call is fetched only where the fetch also beats that one expert on the CPU: a decode step, whose
one token reaches only k experts, never fetches because eight idle experts would have made it
worth it. Decode does not fetch on any shipped profile: a weight copy costs tens of milliseconds,
a CPU expert a few.

Reads: `plan.experts`, `plan.moe_layers`, `plan.memory` (paging), `options.hardware`.
Writes: `ExpertPlacement.fetch_min_tokens` of cpu-tier experts.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import torch.fx

from fiddlerc.compiler.cost import CostModel, choose_layer
from fiddlerc.compiler.options import CompileOptions
from fiddlerc.plan import CPU, Plan
from fiddlerc.units import parse_dtype

MAX_TOKENS = 1 << 16  # a call larger than this is split anyway


def fetch_thresholds(
    model: CostModel, n_resident: int, n_cpu: int, expert_bytes: int, itemsize: int
) -> list[int | None]:
    """Per cpu-tier expert of a layer (in order), the smallest tokens per call from which it is fetched."""
    if model.profile.gpu is None or n_cpu == 0:
        return [None] * n_cpu

    @cache
    def fetched(n: int) -> int:
        call = (model.cpu_expert_ms(n, expert_bytes, itemsize), model.fetch_ms(n, expert_bytes, itemsize))
        if call[1] >= call[0]:  # a call the CPU does faster alone: never fetched (decode: the only CPU call)
            return 0
        resident = n_resident * model.fast_expert_ms(n, expert_bytes, itemsize)
        return sum(choose_layer(model, resident, [call] * n_cpu)[1])

    out: list[int | None] = []
    for rank in range(n_cpu):
        if fetched(MAX_TOKENS) <= rank:
            out.append(None)
            continue
        lo, hi = 1, MAX_TOKENS  # more than `rank` fetched at hi; the count grows with n, so bisect
        while lo < hi:
            mid = (lo + hi) // 2
            if fetched(mid) > rank:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out


def plan_execution(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    if options.hardware is None:
        return plan
    model = CostModel.for_plan(plan, options.hardware)
    itemsize = parse_dtype(plan.model.dtype).itemsize
    threshold: dict[tuple[int, int], int | None] = {}
    tables: dict[tuple[int, int, int], list[int | None]] = {}  # layers of one shape share a table
    for ml in plan.moe_layers:
        on_cpu = [e for e, d in enumerate(plan.placement(ml.layer)) if d == CPU]
        shape = (ml.num_experts - len(on_cpu), len(on_cpu), ml.bytes_per_expert)
        if shape not in tables:
            tables[shape] = fetch_thresholds(model, *shape, itemsize)
        table = tables[shape]
        threshold.update({(ml.layer, e): n for e, n in zip(on_cpu, table, strict=True)})
    experts = tuple(
        replace(e, fetch_min_tokens=threshold[(e.layer, e.expert)]) if e.device == CPU else e for e in plan.experts
    )
    return plan.with_(experts=experts)
