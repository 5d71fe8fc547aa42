"""plan_execution: for each cpu-tier expert, from how many tokens in one call its weights should be
copied to the GPU and computed there instead of on the CPU (a table lookup at run time).

The threshold is the smallest n with `h2d(weights) + t_gpu(n) < t_cpu(n)` under the cost model;
none on a CPU-only profile (there is nothing to fetch to) or when it never pays. Decode (one
token per call) never fetches: a weight copy costs tens of milliseconds, a CPU expert a few.

Reads: `plan.experts`, `plan.moe_layers`, `options.hardware`.
Writes: `ExpertPlacement.fetch_min_tokens` of cpu-tier experts.
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx

from fiddlerc.cost import CostModel
from fiddlerc.options import CompileOptions, parse_dtype
from fiddlerc.plan import CPU, Plan

MAX_TOKENS = 1 << 16  # a call larger than this is split anyway


def fetch_threshold(model: CostModel, expert_bytes: int, itemsize: int) -> int | None:
    """Smallest token count at which fetching the expert beats computing it on the CPU, or None."""
    gpu = model.profile.gpu
    if gpu is None:
        return None
    copy_ms = expert_bytes / (gpu.h2d_gbps * 1e6)

    def pays(n: int) -> bool:
        return copy_ms + model.fast_expert_ms(n, expert_bytes, itemsize) < model.cpu_expert_ms(
            n, expert_bytes, itemsize
        )

    if not pays(MAX_TOKENS):
        return None
    lo, hi = 1, MAX_TOKENS  # pays(hi); both sides are non-decreasing lines in n, so bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if pays(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def plan_execution(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    if options.hardware is None:
        return plan
    model = CostModel(options.hardware)
    itemsize = parse_dtype(plan.model.dtype).itemsize
    per_layer = {ml.layer: fetch_threshold(model, ml.bytes_per_expert, itemsize) for ml in plan.moe_layers}
    experts = tuple(replace(e, fetch_min_tokens=per_layer[e.layer]) if e.device == CPU else e for e in plan.experts)
    return plan.with_(experts=experts)
