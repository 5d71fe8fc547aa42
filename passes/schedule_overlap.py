"""schedule_overlap: split a batch into micro-batches and order their stages so that the CPU experts
of one micro-batch run while the fast device works on another.

A stage is the model's code up to and including one MoE call (whose CPU experts go to the worker
without waiting for them); its wait joins those CPU experts before the micro-batch's next stage.
The last stage is the code after the last MoE call. Ops: `c<mb>.<stage>` (run a stage on the fast
device) and `w<mb>.<stage>` (wait for its CPU experts), with edges c -> w -> next c of the same
micro-batch, in a networkx DAG. A list scheduler plays the DAG over the cost model: the main thread
runs one op at a time, the CPU worker its jobs in submission order; at each step it issues the
ready op that can start soonest (a wait whose CPU work is still running can start only when it
ends), ties to the earlier stage and micro-batch. With two micro-batches that is the software
pipeline c0.0 c1.0 w0.0 c0.1 w1.0 c1.1 ...: micro-batch 0's CPU experts run under micro-batch 1's
attention and fast experts, and the other way round.

Micro-batch count: `--micro-batches N` if given; otherwise 1 without a hardware profile, on a
CPU-only one (both tiers share the cores: overlap cannot pay), or for a batch of 1; otherwise 2 when
the predicted layer time of the pipelined schedule beats the plain one.

Reads: `plan.moe_layers`, `plan.experts`, `plan.memory`, `options.micro_batches`, `options.hardware`.
Writes: `plan.target.micro_batches`, `plan.target.schedule`.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import networkx as nx
import torch.fx

from fiddlerc.compiler.capture import moe_sites
from fiddlerc.compiler.cost import CostModel, layer_dense_ms
from fiddlerc.compiler.options import CompileOptions
from fiddlerc.errors import OptionError
from fiddlerc.plan import CPU, Plan
from fiddlerc.units import parse_dtype


def list_schedule(
    micro: int, stages: int, code_ms: list[float], cpu_ms: list[float], submit_ms: list[float] | None = None
) -> list[str]:
    """Order the ops of `micro` micro-batches x `stages` stages as described above. Per stage: `code_ms`
    on the fast device, of which the first `submit_ms` come before its CPU experts are handed to the
    worker (dense part and routing; the fast experts follow), and `cpu_ms` on the worker."""
    return _play(micro, stages, code_ms, cpu_ms, submit_ms or code_ms)[0]


def _play(
    micro: int, stages: int, code_ms: list[float], cpu_ms: list[float], submit_ms: list[float]
) -> tuple[list[str], float]:
    """The list scheduler: (order, when its last op ends)."""
    g = nx.DiGraph()
    for i in range(micro):
        for s in range(stages):
            g.add_node(f"c{i}.{s}")
            if s < stages - 1:
                g.add_edge(f"c{i}.{s}", f"w{i}.{s}")
                g.add_edge(f"w{i}.{s}", f"c{i}.{s + 1}")
    assert nx.is_directed_acyclic_graph(g)
    waiting = {n: g.in_degree(n) for n in g}
    ready = {n for n, d in waiting.items() if d == 0}
    main = worker = 0.0
    job_done: dict[str, float] = {}
    order: list[str] = []

    def key(op: str) -> tuple:
        kind, rest = op[0], op[1:]
        i, s = (int(x) for x in rest.split("."))
        start = main if kind == "c" else max(main, job_done[f"w{i}.{s}"])
        return (start, s, i, kind)

    while ready:
        op = min(ready, key=key)
        ready.remove(op)
        start, s, i, kind = key(op)
        if kind == "c":
            if s < stages - 1:  # its CPU experts join the worker's queue once the routing is known
                worker = max(worker, start + submit_ms[s]) + cpu_ms[s]
                job_done[f"w{i}.{s}"] = worker
            main = start + code_ms[s]
        else:
            main = start
        order.append(op)
        for nxt in g.successors(op):
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.add(nxt)
    assert len(order) == g.number_of_nodes()
    return order, main


def _stage_costs(plan: Plan, options: CompileOptions, rows: int) -> tuple[list[float], list[float], list[float]]:
    """Per stage, for a micro-batch of `rows` tokens: ms of fast-device work, ms of it before the CPU
    experts are submitted, and ms of CPU-worker work."""
    hw = options.hardware
    stages = len(plan.moe_layers) + 1
    if hw is None:
        return [1.0] * stages, [0.5] * stages, [1.0] * stages
    model = CostModel.for_plan(plan, hw)
    itemsize = parse_dtype(plan.model.dtype).itemsize
    assert plan.memory is not None
    dense = layer_dense_ms(model, plan, rows)
    code, submit, cpu = [], [], []
    for ml in plan.moe_layers:
        on_cpu = sum(1 for d in plan.placement(ml.layer) if d == CPU) / ml.num_experts
        hits = min(ml.num_experts, rows * ml.top_k)  # calls per layer
        per_call = max(1, round(rows * ml.top_k / ml.num_experts))
        code.append(dense + hits * (1 - on_cpu) * model.fast_expert_ms(per_call, ml.bytes_per_expert, itemsize))
        submit.append(dense)
        cpu.append(hits * on_cpu * model.cpu_expert_ms(per_call, ml.bytes_per_expert, itemsize))
    code.append(dense)
    submit.append(dense)
    cpu.append(0.0)
    return code, submit, cpu


def _choose(plan: Plan, options: CompileOptions) -> int:
    if options.micro_batches is not None:
        return options.micro_batches
    hw, batch = options.hardware, plan.target.batch_size
    if hw is None or hw.cpu_only or batch < 2:
        return 1
    (code1, submit1, cpu1), (code2, submit2, cpu2) = (
        _stage_costs(plan, options, batch),
        _stage_costs(plan, options, batch // 2),
    )
    plain = _play(1, len(code1), code1, cpu1, submit1)[1]
    split = _play(2, len(code2), code2, cpu2, submit2)[1]
    return 2 if split < plain else 1


def schedule_overlap(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    micro = _choose(plan, options)
    if micro > 1:
        for site in moe_sites(gm.graph):
            if any(user.target is operator.getitem for user in site.combine.users):
                raise OptionError(
                    f"micro-batching needs MoE blocks that return a tensor; {site.block_path} returns a tuple: "
                    "use --micro-batches 1"
                )
        code, submit, cpu = _stage_costs(plan, options, max(1, plan.target.batch_size // micro))
        order = tuple(list_schedule(micro, len(plan.moe_layers) + 1, code, cpu, submit))
    else:
        order = ()
    return plan.with_(target=replace(plan.target, micro_batches=micro, schedule=order))
