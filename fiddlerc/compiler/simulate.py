"""Discrete-event simulation of a plan's run on a hardware profile: prefill time, decode tokens/s
and each resource's busy time, for a workload (prompt length, output length, batch, beams).

It plays the schedule the runtime (fiddlerc.runtime.experts) executes, priced by the cost model
(fiddlerc.compiler.cost). Four resources, each an in-order queue like a CUDA stream or the one CPU worker
thread:

    gpu  the fast device: each layer's dense part (with the per-layer overhead), resident experts,
         fetched experts, the per-step overhead (a multi-GPU plan's GPUs share this one queue: a
         conservative bound, as their experts could run at the same time)
    cpu  the CPU worker: CPU-tier experts
    h2d  host-to-device copies: weights of fetched experts, the CPU experts' outputs
    d2h  device-to-host copies: the activations the CPU experts need

A task occupies one resource for its duration and starts when its resource has finished the tasks
issued before it and its inputs are done, so the CPU experts of a layer overlap the GPU's. On a
CPU-only profile the fast device is the CPU: `gpu` tasks go to the `cpu` queue and copies take no
time, so the two tiers' work adds up, as it does on that machine.

Routing is sampled per token (k distinct experts, each expert with its plan's expected use) from
a fixed seed, so a simulation is deterministic; the runtime's execution policy (fetch a CPU-tier
expert's weights from `fetch_min_tokens` tokens in one call) is applied to the sampled counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fiddlerc.chrome_trace import chrome_trace
from fiddlerc.compiler.cost import CostModel, layer_dense_ms
from fiddlerc.errors import OptionError
from fiddlerc.hardware import HardwareProfile
from fiddlerc.plan import CPU, ExpertPlacement, MoeLayer, Plan, fetches
from fiddlerc.units import parse_dtype

RESOURCES = ("gpu", "cpu", "h2d", "d2h")


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int
    output_tokens: int  # per sequence, the first of them from the prefill
    batch: int = 1  # sequences
    beams: int = 1  # beams per sequence (each decode step runs batch * beams rows)

    def __post_init__(self) -> None:
        if min(self.prompt_tokens, self.output_tokens, self.batch, self.beams) < 1:
            raise OptionError(f"a workload needs at least one prompt token, output token, sequence and beam: {self}")


@dataclass
class Timeline:
    """In-order resource queues: `add` issues a task and returns when it finishes."""

    cpu_only: bool
    free_at: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESOURCES, 0.0))
    busy: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESOURCES, 0.0))
    events: list[tuple[str, str, float, float]] | None = None  # (name, resource, start ms, ms) when tracing

    def add(self, resource: str, duration: float, after: float = 0.0, name: str = "") -> float:
        """Issue `duration` ms of work on `resource` that may start once `after` (ms) has passed."""
        if self.cpu_only and resource == "gpu":
            resource = "cpu"
        if self.cpu_only and resource in ("h2d", "d2h"):
            return after  # one memory: nothing to copy
        start = max(self.free_at[resource], after)
        self.free_at[resource] = start + duration
        self.busy[resource] += duration
        if self.events is not None and duration > 0:
            self.events.append((name, resource, start, duration))
        return start + duration


@dataclass(frozen=True)
class Simulation:
    workload: Workload
    prefill_ms: float
    decode_ms: float  # all decode steps (output_tokens - 1 of them)
    busy_ms: dict[str, float]  # per resource, over the whole run
    events: tuple[tuple[str, str, float, float], ...] = ()  # (name, resource, start ms, ms) with trace=True

    def trace_json(self) -> str:
        """The predicted schedule as a Chrome/Perfetto trace, in the runtime trace's format."""
        tracks = {"gpu": "fast device (predicted)", "cpu": "CPU worker (predicted)",
                  "h2d": "copies to device (predicted)", "d2h": "copies to host (predicted)"}  # fmt: skip
        slices = [(name, tracks[res], start * 1000, ms * 1000, {}) for name, res, start, ms in self.events]
        return chrome_trace(slices, list(tracks.values()), "fiddlerc simulate")

    @property
    def total_ms(self) -> float:
        return self.prefill_ms + self.decode_ms

    @property
    def tokens_per_s(self) -> float:
        """Output tokens / (prefill + decode time): the Fiddler paper's end-to-end metric."""
        w = self.workload
        return w.output_tokens * w.batch / (self.total_ms / 1000.0)

    @property
    def decode_tokens_per_s(self) -> float:
        w = self.workload
        steps = w.output_tokens - 1
        return steps * w.batch / (self.decode_ms / 1000.0) if steps else float("nan")


@dataclass(frozen=True)
class LayerPlan:
    """What the simulator needs of one MoE layer of the plan, looked up once."""

    layer: MoeLayer
    on_cpu: tuple[bool, ...]  # by expert
    fetch_min_tokens: tuple[int | None, ...]  # by expert
    use: np.ndarray  # expected use, by expert

    @staticmethod
    def of(plan: Plan) -> dict[int, LayerPlan]:
        mine: dict[int, list[ExpertPlacement]] = {ml.layer: [] for ml in plan.moe_layers}
        for e in plan.experts:
            mine[e.layer].append(e)
        out = {}
        for ml in plan.moe_layers:
            experts = sorted(mine[ml.layer], key=lambda e: e.expert)
            out[ml.layer] = LayerPlan(
                ml,
                tuple(e.device == CPU for e in experts),
                tuple(e.fetch_min_tokens for e in experts),
                np.array([e.expected_use for e in experts]),
            )
        return out


def play_layer(
    tl: Timeline,
    model: CostModel,
    plan: Plan,
    layer: int,
    moe: LayerPlan | None,
    counts: np.ndarray | None,
    n_tokens: int,
    kv_bytes: int,
    after: float,
) -> float:
    """Issue one decoder layer's tasks for a call of `n_tokens` rows that may start at `after`;
    `counts[e]` is the number of rows routed to expert e of `moe` (None: a layer without MoE).
    Returns when the layer's output is ready."""
    itemsize = parse_dtype(plan.model.dtype).itemsize
    mem = plan.memory
    assert mem is not None
    routed = tl.add("gpu", layer_dense_ms(model, plan, n_tokens, kv_bytes), after, f"L{layer} dense")
    if moe is None or counts is None:
        return routed
    nbytes = moe.layer.bytes_per_expert
    row_bytes = plan.model.hidden_size * itemsize
    cpu_calls, fetched = [], []
    for e in np.flatnonzero(counts):
        n = int(counts[e])
        if not moe.on_cpu[e]:
            tl.add("gpu", model.fast_expert_ms(n, nbytes, itemsize), routed, f"L{layer} E{e} fast")
        elif fetches(moe.fetch_min_tokens[e], n):
            fetched.append((int(e), n))
        else:
            cpu_calls.append((int(e), n))
    done = routed
    if cpu_calls:
        rows = sum(n for _, n in cpu_calls)
        sent = tl.add("d2h", model.d2h_ms(rows * row_bytes), routed, f"L{layer} to host")
        for e, n in cpu_calls:
            cpu_done = tl.add("cpu", model.cpu_expert_ms(n, nbytes, itemsize), sent, f"L{layer} E{e} cpu")
        done = tl.add("h2d", model.h2d_ms(rows * row_bytes), cpu_done, f"L{layer} from host")
    for e, n in fetched:  # weights copied on the h2d queue, computed on the GPU once they are there
        copy_ms = model.fetch_ms(n, nbytes, itemsize) - model.fast_expert_ms(n, nbytes, itemsize)
        copied = tl.add("h2d", copy_ms, routed, f"L{layer} E{e} weights to device")
        done = max(done, tl.add("gpu", model.fast_expert_ms(n, nbytes, itemsize), copied, f"L{layer} E{e} fetched"))
    return max(done, tl.free_at["cpu" if tl.cpu_only else "gpu"])  # the combine waits for both tiers


def _route(rng: np.random.Generator, use: np.ndarray, k: int, rows: int) -> np.ndarray:
    """Per-expert row counts when `rows` rows each pick k distinct experts, expert e with weight use[e]
    (Gumbel top-k: sampling without replacement in proportion to the weights)."""
    keys = np.log(np.maximum(use, 1e-12)) + rng.gumbel(size=(rows, use.size))
    picks = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    return np.bincount(picks.ravel(), minlength=use.size)


def simulate(
    plan: Plan, profile: HardwareProfile, workload: Workload, *, seed: int = 0, trace: bool = False
) -> Simulation:
    """Play prefill and every decode step of `workload` under `plan` on `profile` (`trace`: keep every
    task for `Simulation.trace_json`)."""
    assert plan.memory is not None and plan.experts, "simulate needs a complete plan"
    model = CostModel.for_plan(plan, profile)
    rng = np.random.default_rng(seed)
    t = plan.target
    kv_per_token_layer = plan.memory.kv_reserve_bytes // (t.context_tokens * t.batch_size * plan.model.num_layers)
    moe = LayerPlan.of(plan)
    tl = Timeline(profile.cpu_only, events=[] if trace else None)

    def step(rows: int, positions: int, start: float) -> float:
        """One forward over `rows` new rows per sequence-beam, with `positions` cached tokens each."""
        now = tl.add("gpu", model.step_overhead_ms, start, "step")
        seqs = workload.batch * workload.beams if rows == 1 else workload.batch
        for layer in range(plan.model.num_layers):
            lp = moe.get(layer)
            counts = None if lp is None else _route(rng, lp.use, lp.layer.top_k, rows * seqs)
            kv = kv_per_token_layer * seqs * (positions + rows)
            now = play_layer(tl, model, plan, layer, lp, counts, rows * seqs, kv, now)
        return now

    prefill = step(workload.prompt_tokens, 0, 0.0)
    end = prefill
    for i in range(1, workload.output_tokens):
        end = step(1, workload.prompt_tokens + i - 1, end)
    return Simulation(workload, prefill, end - prefill, dict(tl.busy), tuple(tl.events or ()))
