"""The latency model and a decode simulator over a plan and a hardware profile.

An expert call reads its weights once and does 2 flops per weight per token; whichever takes
longer bounds it (a roofline): `t(n) = overhead + max(bytes / bandwidth, n * flops / throughput)`.
That is flat while memory-bound (decode, small n) and the Fiddler paper's `a + b*n` once
compute-bound; calibration fits the two pieces where the curve bends. The fast tier uses the GPU's
numbers; on a CPU-only profile it is the CPU itself, and the two tiers' work adds up instead of
overlapping (they share the cores and the memory bus).

Decode of one sequence, per MoE layer: the dense part (attention, norms, router) runs on the fast
device, then the fast-tier experts and the CPU worker's experts run at the same time; the layer
takes the longer of the two. Activation copies are left out: a token's hidden state is kilobytes
(the Fiddler paper measured < 0.1 ms against ~6 ms for a CPU expert). With uniform routing the number of a token's k experts that sit on
the CPU follows a hypergeometric law, so the expected layer time is computed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from fiddlerc.hardware import HardwareProfile
from fiddlerc.options import parse_dtype
from fiddlerc.plan import CPU, Plan


@dataclass(frozen=True)
class CostModel:
    profile: HardwareProfile

    def cpu_expert_ms(self, n_tokens: int, expert_bytes: int, itemsize: int) -> float:
        cpu = self.profile.cpu
        if cpu.expert_curve and expert_bytes == cpu.expert_curve_bytes:
            return cpu.call_overhead_ms + _interpolate(cpu.expert_curve, n_tokens)
        flops = 2 * (expert_bytes // itemsize) * n_tokens
        return cpu.call_overhead_ms + max(expert_bytes / (cpu.mem_bw_gbps * 1e6), flops / (cpu.matmul_tflops * 1e9))

    def fast_expert_ms(self, n_tokens: int, expert_bytes: int, itemsize: int) -> float:
        gpu = self.profile.gpu
        if gpu is None:
            return self.cpu_expert_ms(n_tokens, expert_bytes, itemsize)
        flops = 2 * (expert_bytes // itemsize) * n_tokens
        return gpu.call_overhead_ms + max(expert_bytes / (gpu.mem_bw_gbps * 1e6), flops / (gpu.matmul_tflops * 1e9))

    def fast_read_ms(self, n_bytes: int) -> float:
        """Time to stream `n_bytes` of weights or cache once on the fast device."""
        bw = self.profile.gpu.mem_bw_gbps if self.profile.gpu is not None else self.profile.cpu.mem_bw_gbps
        return n_bytes / (bw * 1e6)


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
    dense_ms: float  # embeddings, attention, norms, lm_head and the KV cache read, per token
    fast_expert_ms: float  # expected busy time of the fast tier's experts, per token
    cpu_expert_ms: float  # expected busy time of the CPU worker, per token

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.ms_per_token


def _layer_ms(k: int, n_fast: int, n_cpu: int, t_fast: float, t_cpu: float, shared: bool) -> float:
    """Expected time of one MoE layer for one token whose k experts are drawn uniformly without replacement."""
    total = comb(n_fast + n_cpu, k)
    expected = 0.0
    for j in range(max(0, k - n_fast), min(k, n_cpu) + 1):  # j of the k experts on the CPU
        p = comb(n_cpu, j) * comb(n_fast, k - j) / total
        fast, cpu = (k - j) * t_fast, j * t_cpu
        expected += p * (fast + cpu if shared else max(fast, cpu))
    return expected


def predict_decode(
    plan: Plan, profile: HardwareProfile, position: int | None = None, hidden_bytes: int = 0
) -> DecodePrediction:
    """Expected time per generated token of one sequence at a given position (default: half the context)."""
    assert plan.memory is not None
    model = CostModel(profile)
    itemsize = parse_dtype(plan.model.dtype).itemsize
    t = plan.target
    pos = t.context_tokens // 2 if position is None else position
    kv_per_token = plan.memory.kv_reserve_bytes // (t.context_tokens * t.batch_size)
    dense = model.fast_read_ms(plan.memory.dense_bytes + kv_per_token * pos)
    fast_total = cpu_total = layers = 0.0
    for ml in plan.moe_layers:
        placement = plan.placement(ml.layer)
        n_cpu = sum(1 for d in placement if d == CPU)
        t_fast = model.fast_expert_ms(1, ml.bytes_per_expert, itemsize)
        t_cpu = model.cpu_expert_ms(1, ml.bytes_per_expert, itemsize)
        layers += _layer_ms(ml.top_k, ml.num_experts - n_cpu, n_cpu, t_fast, t_cpu, profile.cpu_only)
        share = ml.top_k / ml.num_experts
        fast_total += share * (ml.num_experts - n_cpu) * t_fast
        cpu_total += share * n_cpu * t_cpu
    return DecodePrediction(dense + layers, dense, fast_total, cpu_total)


@dataclass(frozen=True)
class ExpertChoice:
    """Where one non-resident expert runs for a call with n tokens, and why."""

    on_gpu: bool  # True: its weights are copied to the GPU for this call; False: computed on the CPU
    cpu_ms: float
    fetch_ms: float  # copy + GPU compute


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


def predict_prefill(plan: Plan, profile: HardwareProfile, n_tokens: int) -> float:
    """Expected prefill time (ms) of one prompt: dense part as a roofline over all tokens, then per MoE
    layer each expert sees its expected share of the n*k routed tokens and the execution policy picks
    CPU or weight fetch for each non-resident expert."""
    assert plan.memory is not None
    model = CostModel(profile)
    itemsize = parse_dtype(plan.model.dtype).itemsize
    dense_flops = 2 * (plan.memory.dense_bytes // itemsize) * n_tokens
    tput = profile.gpu.matmul_tflops if profile.gpu is not None else profile.cpu.matmul_tflops
    total = max(model.fast_read_ms(plan.memory.dense_bytes), dense_flops / (tput * 1e9))
    gpu = profile.gpu
    for ml in plan.moe_layers:
        per_expert = max(1, round(n_tokens * ml.top_k / ml.num_experts))
        placement = plan.placement(ml.layer)
        resident = sum(model.fast_expert_ms(per_expert, ml.bytes_per_expert, itemsize) for d in placement if d != CPU)
        calls = []
        for d in placement:
            if d == CPU:
                cpu_ms = model.cpu_expert_ms(per_expert, ml.bytes_per_expert, itemsize)
                fetch_ms = (
                    ml.bytes_per_expert / (gpu.h2d_gbps * 1e6)
                    + model.fast_expert_ms(per_expert, ml.bytes_per_expert, itemsize)
                    if gpu is not None
                    else float("inf")  # nowhere to fetch to on a CPU-only machine
                )
                calls.append((cpu_ms, fetch_ms))
        layer_ms, _ = choose_layer(model, resident, calls)
        total += layer_ms
    return total


def predict_generation(plan: Plan, profile: HardwareProfile, input_tokens: int, output_tokens: int) -> float:
    """Output tokens / (prefill + decode time) for one sequence, the Fiddler paper's metric."""
    ms = predict_prefill(plan, profile, input_tokens)
    for i in range(1, output_tokens):  # the first output token comes from the prefill
        ms += predict_decode(plan, profile, position=input_tokens + i).ms_per_token
    return output_tokens / (ms / 1000.0)
