"""place_experts: give every routed expert a device, `cuda:0` (fast tier) or `cpu`.

Objective: the most expected routed tokens served by the fast tier, under the memory left after
the dense weights and the KV reserve. Experts are taken in order of expected use (uniform until
profiling exists: top_k / num_experts), ties broken round-robin over layers so every layer gets
a similar share, and placed while they fit. `--fast-experts N` takes the best N instead and
fails if they do not fit.

Reads: `plan.moe_layers`, `plan.memory`, `options.fast_experts`.
Writes: `plan.experts`, `plan.memory.expert_bytes`; `node.meta["fiddlerc"]["device"]` on expert nodes.
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx

from fiddlerc.capture import META_KEY, moe_sites
from fiddlerc.errors import BudgetError
from fiddlerc.options import CompileOptions, format_size
from fiddlerc.plan import CPU, ExpertPlacement, Plan


def place_experts(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    assert plan.memory is not None, "account_memory must run before place_experts"
    fast = plan.target.device
    candidates = []
    for ml in plan.moe_layers:
        for e in range(ml.num_experts):
            candidates.append((ml.top_k / ml.num_experts, e, ml.layer, ml.bytes_per_expert))
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))

    free = plan.memory.free_bytes
    want = options.fast_experts
    if want is not None:
        if want > len(candidates):
            raise BudgetError(f"--fast-experts {want} asks for more experts than the model has ({len(candidates)})")
        need = sum(c[3] for c in candidates[:want])
        if need > free:
            raise BudgetError(
                f"--fast-experts {want} needs {format_size(need)} on {fast}, but the budget leaves "
                f"{format_size(free)} after dense weights and KV reserve: raise --gpu-memory or lower --fast-experts"
            )

    placements = []
    for rank, (use, e, layer, nbytes) in enumerate(candidates, start=1):
        head = f"rank {rank}/{len(candidates)} by expected use {use:.3f}"
        if want is not None:
            on_fast = rank <= want
            why = f"{head}, within --fast-experts {want}" if on_fast else f"{head}, beyond --fast-experts {want}"
        else:
            on_fast = nbytes <= free
            why = (
                f"{head}, fits ({format_size(free)} free)"
                if on_fast
                else f"{head}, over budget ({format_size(free)} free)"
            )
        if on_fast:
            free -= nbytes
        placements.append(ExpertPlacement(layer, e, fast if on_fast else CPU, nbytes, round(use, 6), why))
    placements.sort(key=lambda p: (p.layer, p.expert))

    expert_bytes: dict[str, int] = {}
    for p in placements:
        expert_bytes[p.device] = expert_bytes.get(p.device, 0) + p.bytes
    devices = {(p.layer, p.expert): p.device for p in placements}
    for site in moe_sites(gm.graph):
        for node in site.experts:
            fact = node.meta[META_KEY]
            fact["device"] = devices[(fact["layer"], fact["expert"])]
    ordered = {d: expert_bytes[d] for d in sorted(expert_bytes, key=lambda d: (d == CPU, d))}
    return plan.with_(experts=tuple(placements), memory=replace(plan.memory, expert_bytes=ordered))
