"""place_experts: give every routed expert a device, `cuda:0` (fast tier) or `cpu`.

Objective: the minimal predicted decode time per token under the memory left after the dense
weights and the KV reserve. An expert on the fast tier saves `use * (t_cpu(1) - t_fast(1))` per
token, where `use` is its expected share of its layer's routed tokens (uniform unless measured:
top_k / num_experts; measured counts with `--popularity`) and the times come from the cost
model of `options.hardware`.
Experts are taken in order of that saving per byte (the knapsack greedy, exact when experts are
one size, as they are within a model), ties broken round-robin over layers so every layer gets a
similar share, and placed while they fit. With measured popularity the skewed layers' busy experts
rank first, so those layers get more of the fast tier. Without a hardware profile, or on a CPU-only one where both
tiers are the CPU, the saving is taken as proportional to the bytes read, so the order is by
expected use. `--fast-experts N` takes the best N instead and fails if they do not fit.

Several GPUs (`--gpu-memory cuda:0=20GiB,cuda:1=10GiB`; the first holds the dense weights and the
KV reserve, the others experts only): the same objective, solved as a min-cost flow over networkx
(`assign_by_flow`), exact since a model's experts are one size.

A CPU-only plan (`--gpu-memory 0`, or no CUDA device and no --gpu-memory) puts every expert on the CPU.

Host memory: the bytes the run keeps in host memory (the CPU-tier experts; everything on a
CPU-only target) against `--cpu-memory` (default: the profile's memory). More than fits is not an
error: the weights are memory-mapped, so the run pages from disk, and the cost model prices that.

Reads: `plan.moe_layers`, `plan.memory`, `plan.target` (GPUs, budgets, fast_experts), `options.hardware`, `options.cpu_memory_bytes`,
`options.popularity`.
Writes: `plan.experts`, `plan.memory.expert_bytes`, `plan.memory.host_bytes`/`host_budget_bytes`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch.fx

from fiddlerc.compiler.cost import CostModel
from fiddlerc.compiler.options import CompileOptions
from fiddlerc.errors import BudgetError
from fiddlerc.plan import CPU, ExpertPlacement, Plan
from fiddlerc.quant_format import stored_bytes
from fiddlerc.units import format_size, parse_dtype


class Candidate(NamedTuple):
    per_byte: float  # the ranking key: predicted saving per byte (expected use without a profile)
    use: float  # expected share of the layer's routed tokens (sums to top_k over the layer)
    saving: float | None  # predicted ms per token saved on the fast tier; None without a profile
    expert: int
    layer: int
    nbytes: int


def place_experts(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    assert plan.memory is not None, "account_memory must run before place_experts"
    fast = plan.target.device
    pop = options.popularity
    if pop is not None:
        pop.check_against(plan.moe_layers)
    candidates: list[Candidate] = []
    for row, ml in enumerate(plan.moe_layers):
        saved = _saving_ms(
            options, ml.bytes_per_expert, parse_dtype(plan.model.dtype).itemsize, plan.target.expert_dtype
        )
        uses = pop.use(row, ml.top_k) if pop is not None else (ml.top_k / ml.num_experts,) * ml.num_experts
        for e in range(ml.num_experts):
            use = uses[e]
            per_byte = use * saved / ml.bytes_per_expert if saved is not None else use
            saving = use * saved if saved is not None else None
            candidates.append(Candidate(per_byte, use, saving, e, ml.layer, ml.bytes_per_expert))
    candidates.sort(key=lambda c: (-c.per_byte, -c.use, c.expert, c.layer))

    want = plan.target.fast_experts
    gpus = plan.target.gpus()
    free = {fast: plan.memory.free_bytes, **plan.target.more_gpus}  # bytes each GPU has for experts
    if want is not None:
        if want > len(candidates):
            raise BudgetError(f"--fast-experts {want} asks for more experts than the model has ({len(candidates)})")
        need = sum(c.nbytes for c in candidates[:want])
        if need > sum(free.values()):
            where = fast if len(gpus) == 1 else " + ".join(gpus)
            raise BudgetError(
                f"--fast-experts {want} needs {format_size(need)} on {where}, but the budget leaves "
                f"{format_size(sum(free.values()))} after dense weights and KV reserve: raise --gpu-memory or lower --fast-experts"
            )

    if len(gpus) > 1:
        scores = [c.saving if c.saving is not None else c.use for c in candidates]
        flow = assign_by_flow(scores, [c.nbytes for c in candidates], free, gpus, want)
    placements = []
    for rank, (_, use, saving, e, layer, nbytes) in enumerate(candidates, start=1):
        by = f"saves {saving:.3f} ms/token on the fast tier, " if saving is not None else ""
        head = f"rank {rank}/{len(candidates)}: {by}expected use {use:.3f} ({'measured' if pop else 'uniform'})"
        if len(gpus) > 1:
            device = flow[rank - 1]
            why = f"{head}, min-cost flow over {', '.join(gpus)} and the CPU: {device}"
        elif plan.target.cpu_only:
            device, why = CPU, f"{head}, CPU-only plan (no GPU tier)"
        elif want is not None:
            device = fast if rank <= want else CPU
            why = f"{head}, within --fast-experts {want}" if rank <= want else f"{head}, beyond --fast-experts {want}"
        else:
            device = fast if nbytes <= free[fast] else CPU
            shown = format_size(free[fast])
            why = f"{head}, fits ({shown} free)" if device != CPU else f"{head}, over budget ({shown} free)"
            if device != CPU:
                free[fast] -= nbytes
        placements.append(ExpertPlacement(layer, e, device, nbytes, round(use, 6), why))
    placements.sort(key=lambda p: (p.layer, p.expert))

    expert_bytes: dict[str, int] = {}
    for p in placements:
        expert_bytes[p.device] = expert_bytes.get(p.device, 0) + p.bytes
    ordered = {d: expert_bytes[d] for d in sorted(expert_bytes, key=lambda d: (d == CPU, d))}
    hw = options.hardware
    mem = plan.memory
    itemsize = parse_dtype(plan.model.dtype).itemsize
    host = stored_bytes(expert_bytes.get(CPU, 0), itemsize, plan.target.expert_dtype)  # quantized where asked
    if plan.target.cpu_only or (hw is not None and hw.cpu_only):  # the "GPU" is the CPU: all in host memory
        host = mem.dense_bytes + mem.kv_reserve_bytes + host + sum(b for d, b in expert_bytes.items() if d != CPU)
    host_budget = options.cpu_memory_bytes
    if host_budget is None and hw is not None:
        host_budget = hw.cpu.memory_bytes
    memory = replace(
        mem,
        expert_bytes=ordered,
        host_bytes=host,
        host_budget_bytes=host_budget,
        host_budget_given=options.cpu_memory_bytes is not None,
    )
    return plan.with_(experts=tuple(placements), memory=memory)


def assign_by_flow(
    scores: list[float], sizes: list[int], free: dict[str, int], gpus: tuple[str, ...], limit: int | None
) -> list[str]:
    """Device of each expert (given in rank order, with its score and size) that maximises the summed
    score of GPU-placed ones, each GPU holding `free[gpu] // size` experts (at most `limit` on all GPUs together): a min-cost flow
    source -> expert -> (GPU | cpu) -> sink over networkx, exact because experts are one size. Ties go
    to the better-ranked expert and to the GPU named first. Every GPU scores an expert alike (a profile
    has one GPU spec), so no optimum uses an expert ranked below the S-th, S the GPU slots: those stay
    on the CPU without entering the network (DeepSeek-V3's 14848 experts: seconds instead of minutes)."""
    import networkx as nx

    if len(set(sizes)) != 1:
        raise BudgetError(
            "placing experts over several GPUs needs experts of one size; this model's differ: use one GPU"
        )
    size = sizes[0]
    k = len(gpus)
    slots = {g: max(0, free[g]) // size for g in gpus}
    reachable = sum(slots.values()) if limit is None else min(limit, sum(slots.values()))
    n = min(len(scores), reachable)  # candidates come in rank order: the rest cannot reach a GPU
    # Integer costs, in lexicographic order: score first, then better-ranked experts onto GPUs, then
    # better-ranked experts onto the GPUs named first.
    pick = n * n * k + 1  # one step of rank outweighs every device preference together
    scale = n * (n * pick + n * k) + 1  # one unit of score outweighs every tie-break together
    g = nx.DiGraph()
    g.add_node("source", demand=-n)
    g.add_node("sink", demand=n)
    g.add_edge("gpus", "sink", capacity=reachable, weight=0)
    g.add_edge("cpu", "sink", capacity=n, weight=0)
    for gpu in gpus:
        g.add_edge(("gpu", gpu), "gpus", capacity=slots[gpu], weight=0)
    for i, score in enumerate(scores[:n]):
        g.add_edge("source", ("expert", i), capacity=1, weight=0)
        g.add_edge(("expert", i), "cpu", capacity=1, weight=0)
        for d, gpu in enumerate(gpus):
            tie = i * pick + (n - i) * d
            g.add_edge(("expert", i), ("gpu", gpu), capacity=1, weight=-round(score * 1e6) * scale + tie)
    flow = nx.min_cost_flow(g)
    placed = [next((gpu for gpu in gpus if flow[("expert", i)][("gpu", gpu)]), CPU) for i in range(n)]
    return placed + [CPU] * (len(scores) - n)


def _saving_ms(options: CompileOptions, expert_bytes: int, itemsize: int, cpu_format: str | None) -> float | None:
    """Decode time one token saves when it finds this expert on the fast tier; None: no profile to price it."""
    hw = options.hardware
    if hw is None or hw.cpu_only:
        return None
    model = CostModel(hw, cpu_format=cpu_format)  # a quantized cpu tier saves less per expert moved to the GPU
    return model.cpu_expert_ms(1, expert_bytes, itemsize) - model.fast_expert_ms(1, expert_bytes, itemsize)
