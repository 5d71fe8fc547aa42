"""The latency model: what one expert call, one layer's fixed costs and one decode step cost on a
hardware profile. The discrete-event simulator (fiddlerc.compiler.simulate) plays whole runs over these costs.

An expert call reads its weights once and does 2 flops per weight per token; whichever takes
longer bounds it (a roofline): `t(n) = overhead + max(bytes / bandwidth, n * flops / throughput)`.
That is flat while memory-bound (decode, small n) and the Fiddler paper's `a + b*n` once
compute-bound; calibration measures the curve and the cost model interpolates it for that expert
size. The fast tier uses the GPU's numbers; on a CPU-only profile it is the CPU itself, and the
two tiers' work adds up instead of overlapping (they share the cores and the memory bus).
Beyond weight reads, the framework costs a fixed time per decoder layer (kernel launches, the
per-layer host sync, Python dispatch) and per decode step; calibration measures both on a
width-reduced copy of the model.

When the CPU-tier weights do not fit in host memory (`Memory.paged_fraction`), that fraction of a
CPU expert's reads comes from disk instead (uniform access over memory-mapped weights: the page
cache holds a random `budget / needed` share of them).

Decode of one sequence, per MoE layer: the dense part (attention, norms, router) runs on the fast
device, then the fast-tier experts and the CPU worker's experts run at the same time; the layer
takes the longer of the two. Activation copies are left out here: a token's hidden state is
kilobytes (the Fiddler paper measured < 0.1 ms against ~6 ms for a CPU expert); the simulator
prices them. With uniform routing the number of a token's k experts that sit on the CPU follows a
hypergeometric law, so the expected layer time is computed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from fiddlerc.errors import OptionError
from fiddlerc.hardware import HardwareProfile
from fiddlerc.plan import CPU, Plan
from fiddlerc.quant_format import stored_bytes
from fiddlerc.units import format_size, parse_dtype


@dataclass(frozen=True)
class CostModel:
    profile: HardwareProfile
    page_fraction: float = 0.0  # share of CPU-tier weight reads that come from disk (host memory too small)
    cpu_format: str | None = None  # what cpu-tier experts are stored in (target.expert_dtype); None: the compute dtype
    dense_format: str | None = (
        None  # what the dense projections are stored in on a CPU-only machine (target.dense_dtype)
    )

    @classmethod
    def for_plan(cls, plan: Plan, profile: HardwareProfile) -> CostModel:
        """The cost model of `profile` with the plan's host-memory paging."""
        paged = plan.memory.paged_fraction if plan.memory is not None else 0.0
        if paged > 0 and profile.cpu.disk_gbps <= 0:
            raise OptionError(
                f"the plan pages {paged:.0%} of the CPU-tier weights from disk (host memory "
                f"{format_size(plan.memory.host_budget_bytes or 0)} < {format_size(plan.memory.host_bytes or 0)} needed), "
                f"but hardware profile {profile.name!r} has no cpu.disk_gbps: add it, or raise --cpu-memory"
            )
        return cls(profile, paged, plan.target.expert_dtype, plan.target.dense_dtype)

    def cpu_expert_ms(self, n_tokens: int, expert_bytes: int, itemsize: int, quantized: bool = True) -> float:
        """A cpu-tier expert of `expert_bytes` in the compute dtype, read in `cpu_format` (`quantized`; else
        in the compute dtype): a roofline, or the profile's measured curve for that size and format."""
        cpu = self.profile.cpu
        fmt = self.cpu_format if quantized else None
        read = stored_bytes(expert_bytes, itemsize, fmt)
        paging = self.paging_ms(read)
        measured = expert_bytes == cpu.expert_curve_bytes and (fmt or "") == cpu.expert_curve_format
        if cpu.expert_curve and measured:
            return cpu.call_overhead_ms + _interpolate(cpu.expert_curve, n_tokens) + paging
        flops = 2 * (expert_bytes // itemsize) * n_tokens
        compute = max(read / (cpu.mem_bw_gbps * 1e6), flops / (cpu.matmul_tflops * 1e9))
        return cpu.call_overhead_ms + compute + paging

    def fast_expert_ms(self, n_tokens: int, expert_bytes: int, itemsize: int) -> float:
        gpu = self.profile.gpu
        if gpu is None:  # CPU-only: the fast tier is the CPU (and pages like it), in the compute dtype
            return self.cpu_expert_ms(n_tokens, expert_bytes, itemsize, quantized=False)
        flops = 2 * (expert_bytes // itemsize) * n_tokens
        return gpu.call_overhead_ms + max(expert_bytes / (gpu.mem_bw_gbps * 1e6), flops / (gpu.matmul_tflops * 1e9))

    def paging_ms(self, expert_bytes: int) -> float:
        """Expected disk time of reading one CPU-tier expert when host memory is short."""
        return self.page_fraction * expert_bytes / (self.profile.cpu.disk_gbps * 1e6) if self.page_fraction else 0.0

    def fetch_ms(self, n_tokens: int, expert_bytes: int, itemsize: int) -> float:
        """Copy a CPU-tier expert's weights (paged in first if need be) to the GPU and compute it there
        (inf without a GPU)."""
        gpu = self.profile.gpu
        if gpu is None:
            return float("inf")  # nowhere to fetch to on a CPU-only machine
        copy = self.paging_ms(expert_bytes) + self.h2d_ms(expert_bytes)
        return copy + self.fast_expert_ms(n_tokens, expert_bytes, itemsize)

    def h2d_ms(self, n_bytes: int) -> float:
        gpu = self.profile.gpu
        return 0.0 if gpu is None else n_bytes / (gpu.h2d_gbps * 1e6)

    def d2h_ms(self, n_bytes: int) -> float:
        gpu = self.profile.gpu
        return 0.0 if gpu is None else n_bytes / (gpu.d2h_gbps * 1e6)

    def fast_read_ms(self, n_bytes: int) -> float:
        """Time to stream `n_bytes` of weights or cache once on the fast device."""
        bw = self.profile.gpu.mem_bw_gbps if self.profile.gpu is not None else self.profile.cpu.mem_bw_gbps
        return n_bytes / (bw * 1e6)

    def dense_ms(self, n_bytes: int, n_tokens: int, itemsize: int) -> float:
        """The dense weights' roofline on the fast device for a call of n tokens (`n_bytes` in the compute
        dtype; on a CPU-only machine read in `dense_format`)."""
        tput = self.profile.gpu.matmul_tflops if self.profile.gpu is not None else self.profile.cpu.matmul_tflops
        read = n_bytes if self.profile.gpu is not None else stored_bytes(n_bytes, itemsize, self.dense_format)
        return max(self.fast_read_ms(read), 2 * (n_bytes // itemsize) * n_tokens / (tput * 1e9))

    @property
    def layer_overhead_ms(self) -> float:
        fast = self.profile.gpu or self.profile.cpu
        return fast.layer_overhead_ms

    @property
    def step_overhead_ms(self) -> float:
        fast = self.profile.gpu or self.profile.cpu
        return fast.step_overhead_ms


def _interpolate(curve: tuple[tuple[int, float], ...], n: int) -> float:
    """Piecewise-linear in n through measured (tokens, ms) points, extended by the end slopes."""
    if len(curve) == 1:
        return curve[0][1] * max(1.0, n / curve[0][0])
    for (n0, t0), (n1, t1) in zip(curve, curve[1:], strict=False):
        if n <= n1 or (n1, t1) == curve[-1]:
            return max(0.0, t0 + (t1 - t0) * (n - n0) / (n1 - n0))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class DecodePrediction:
    ms_per_token: float
    dense_ms: float  # embeddings, attention, norms, lm_head, the KV cache read and fixed overheads, per token
    fast_expert_ms: float  # expected busy time of the fast tier's experts, per token
    cpu_expert_ms: float  # expected busy time of the CPU worker, per token

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.ms_per_token


def layer_dense_ms(model: CostModel, plan: Plan, n_tokens: int, kv_bytes: int = 0) -> float:
    """One decoder layer's work beside its routed experts, on the fast device, for a call of `n_tokens`
    rows that reads `kv_bytes` of KV cache: the per-layer overhead, the layer's share of the dense weights
    (a roofline) and the cache read. The closed form (`predict_decode`), the simulator
    (fiddlerc.compiler.simulate) and the micro-batch scheduler (passes/schedule_overlap.py) all price a
    layer with this."""
    assert plan.memory is not None
    itemsize = parse_dtype(plan.model.dtype).itemsize
    share = model.dense_ms(plan.memory.dense_bytes // plan.model.num_layers, n_tokens, itemsize)
    return model.layer_overhead_ms + share + model.fast_read_ms(kv_bytes)


def _layer_ms(
    k: int, n_fast: int, n_cpu: int, t_fast: float, t_cpu: float, shared: bool, cpu_share: float | None
) -> float:
    """Expected time of one MoE layer for one token. Uniform routing (`cpu_share` None): the token's k
    experts are drawn without replacement, so the number on the CPU is hypergeometric. Measured
    popularity: each pick lands on the CPU tier with probability `cpu_share` (its share of the use),
    binomially (weighted draws without replacement have no closed form; the simulator samples them)."""
    feasible = range(max(0, k - n_fast), min(k, n_cpu) + 1)  # j of the k experts on the CPU
    if cpu_share is None:
        probs = [comb(n_cpu, j) * comb(n_fast, k - j) / comb(n_fast + n_cpu, k) for j in feasible]
    else:
        probs = [comb(k, j) * cpu_share**j * (1 - cpu_share) ** (k - j) for j in feasible]
        total = sum(probs) or 1.0
        probs = [p / total for p in probs]  # no more than n_cpu picks can land on the CPU tier
    expected = 0.0
    for j, p in zip(feasible, probs, strict=True):
        fast, cpu = (k - j) * t_fast, j * t_cpu
        expected += p * (fast + cpu if shared else max(fast, cpu))
    return expected


def predict_decode(plan: Plan, profile: HardwareProfile, position: int | None = None) -> DecodePrediction:
    """Expected time per generated token of one sequence at a given position (default: half the context)."""
    assert plan.memory is not None
    model = CostModel.for_plan(plan, profile)
    itemsize = parse_dtype(plan.model.dtype).itemsize
    t = plan.target
    pos = t.context_tokens // 2 if position is None else position
    kv_per_token_layer = plan.memory.kv_reserve_bytes // (t.context_tokens * t.batch_size * plan.model.num_layers)
    dense = model.step_overhead_ms + plan.model.num_layers * layer_dense_ms(model, plan, 1, kv_per_token_layer * pos)
    fast_total = cpu_total = layers = 0.0
    by_layer: dict[int, list] = {ml.layer: [] for ml in plan.moe_layers}
    for e in plan.experts:
        by_layer[e.layer].append(e)
    for ml in plan.moe_layers:
        mine = by_layer[ml.layer]
        n_cpu = sum(1 for e in mine if e.device == CPU)
        t_fast = model.fast_expert_ms(1, ml.bytes_per_expert, itemsize)
        t_cpu = model.cpu_expert_ms(1, ml.bytes_per_expert, itemsize)
        use = sum(e.expected_use for e in mine) or 1.0
        cpu_use = sum(e.expected_use for e in mine if e.device == CPU) / use  # share of the picks
        uniform = len({round(e.expected_use, 6) for e in mine}) <= 1
        share = None if uniform else cpu_use
        layers += _layer_ms(ml.top_k, ml.num_experts - n_cpu, n_cpu, t_fast, t_cpu, profile.cpu_only, share)
        fast_total += ml.top_k * (1 - cpu_use) * t_fast
        cpu_total += ml.top_k * cpu_use * t_cpu
    return DecodePrediction(dense + layers, dense, fast_total, cpu_total)


def choose_layer(model: CostModel, resident_ms: float, calls: list[tuple[float, float]]) -> tuple[float, list[bool]]:
    """Per-layer execution policy: which non-resident experts to fetch to the GPU so that the layer's
    makespan max(GPU total, CPU total) is smallest (both run at once). `calls` holds (cpu_ms, fetch_ms)
    per non-resident expert with tokens. Greedy: fetch the calls that save the most CPU time per GPU
    millisecond while that lowers the makespan (exact for identical calls, as with uniform routing)."""
    order = sorted(range(len(calls)), key=lambda i: calls[i][0] / calls[i][1], reverse=True)
    fetched = [False] * len(calls)
    gpu, cpu = resident_ms, sum(c for c, _ in calls)
    shared = model.profile.cpu_only
    best = gpu + cpu if shared else max(gpu, cpu)
    for i in order:
        g, c = gpu + calls[i][1], cpu - calls[i][0]
        span = g + c if shared else max(g, c)
        if span >= best:
            break
        fetched[i], gpu, cpu, best = True, g, c, span
    return best, fetched
