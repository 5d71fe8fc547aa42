"""place_experts: give every routed expert a device, `cuda:0` (fast tier) or `cpu`.

Objective: the minimal predicted decode time per token under the memory left after the dense
weights and the KV reserve. An expert on the fast tier saves `use * (t_cpu(1) - t_fast(1))` per
token, where `use` is its expected share of its layer's routed tokens (uniform until profiling
exists: top_k / num_experts; measured with `--popularity`) and the times come from the cost
model of `options.hardware`.
Experts are taken in order of that saving per byte (the knapsack greedy, exact when experts are
one size, as they are within a model), ties broken round-robin over layers so every layer gets a
similar share, and placed while they fit. With measured popularity the skewed layers' busy experts
rank first, so those layers get more of the fast tier. Without a profile, or on a CPU-only one where both
tiers are the CPU, the saving is taken as proportional to the bytes read, so the order is by
expected use. `--fast-experts N` takes the best N instead and fails if they do not fit.

Host memory: the bytes the run keeps in host memory (the CPU-tier experts; everything on a
CPU-only target) against `--cpu-memory` (default: the profile's memory). More than fits is not an
error: the weights are memory-mapped, so the run pages from disk, and the cost model prices that.

Reads: `plan.moe_layers`, `plan.memory`, `options.fast_experts`, `options.hardware`, `options.cpu_memory_bytes`,
`options.popularity`.
Writes: `plan.experts`, `plan.memory.expert_bytes`, `plan.memory.host_bytes`/`host_budget_bytes`;
`node.meta["fiddlerc"]["device"]` on expert nodes.
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx

from fiddlerc.capture import META_KEY, moe_sites
from fiddlerc.cost import CostModel
from fiddlerc.errors import BudgetError
from fiddlerc.options import CompileOptions, format_size, parse_dtype
from fiddlerc.plan import CPU, ExpertPlacement, Plan


def place_experts(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    assert plan.memory is not None, "account_memory must run before place_experts"
    fast = plan.target.device
    pop = options.popularity
    if pop is not None:
        pop.check_against(plan.moe_layers)
    candidates = []  # (saving per byte, use, saving ms/token, expert, layer, bytes)
    for row, ml in enumerate(plan.moe_layers):
        saved = _saving_ms(options, ml.bytes_per_expert, parse_dtype(plan.model.dtype).itemsize)
        uses = pop.use(row, ml.top_k) if pop is not None else (ml.top_k / ml.num_experts,) * ml.num_experts
        for e in range(ml.num_experts):
            use = uses[e]
            per_byte = use * saved / ml.bytes_per_expert if saved is not None else use
            candidates.append(
                (per_byte, use, use * saved if saved is not None else None, e, ml.layer, ml.bytes_per_expert)
            )
    candidates.sort(key=lambda c: (-c[0], -c[1], c[3], c[4]))

    free = plan.memory.free_bytes
    want = options.fast_experts
    if want is not None:
        if want > len(candidates):
            raise BudgetError(f"--fast-experts {want} asks for more experts than the model has ({len(candidates)})")
        need = sum(c[5] for c in candidates[:want])
        if need > free:
            raise BudgetError(
                f"--fast-experts {want} needs {format_size(need)} on {fast}, but the budget leaves "
                f"{format_size(free)} after dense weights and KV reserve: raise --gpu-memory or lower --fast-experts"
            )

    placements = []
    for rank, (_, use, saving, e, layer, nbytes) in enumerate(candidates, start=1):
        by = f"saves {saving:.3f} ms/token on the fast tier, " if saving is not None else ""
        head = f"rank {rank}/{len(candidates)}: {by}expected use {use:.3f} ({'measured' if pop else 'uniform'})"
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
    hw = options.hardware
    mem = plan.memory
    host = expert_bytes.get(CPU, 0)
    if hw is not None and hw.cpu_only:  # the "GPU" is the CPU: everything lives in host memory
        host = mem.dense_bytes + mem.kv_reserve_bytes + sum(expert_bytes.values())
    host_budget = options.cpu_memory_bytes
    if host_budget is None and hw is not None:
        host_budget = hw.cpu.memory_bytes
    memory = replace(mem, expert_bytes=ordered, host_bytes=host, host_budget_bytes=host_budget)
    return plan.with_(experts=tuple(placements), memory=memory)


def _saving_ms(options: CompileOptions, expert_bytes: int, itemsize: int) -> float | None:
    """Decode time one token saves when it finds this expert on the fast tier; None: no profile to price it."""
    hw = options.hardware
    if hw is None or hw.cpu_only:
        return None
    model = CostModel(hw)
    return model.cpu_expert_ms(1, expert_bytes, itemsize) - model.fast_expert_ms(1, expert_bytes, itemsize)
