"""The Plan: every compile decision as plain, frozen data that round-trips through JSON.

The plan is the one source of truth: passes fill it in, `fiddlerc.plan_file.verify_plan` checks it
after every pass and whenever it is read from disk (plan_file also writes and reads plan.json),
codegen turns it into module.py. It imports nothing of ours, so any tool can read a plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

FORMAT_VERSION = 1

CPU = "cpu"
_GPU_RE = re.compile(r"cuda:[0-9]{1,3}")  # the one rule for a GPU's name


def is_gpu_name(name: object) -> bool:
    """Whether `name` names a GPU of a plan: cuda:0 .. cuda:999."""
    return isinstance(name, str) and _GPU_RE.fullmatch(name) is not None


DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what a plan computes in (fiddlerc.units maps them to torch)
QUANTIZED = ("int8", "int4", "mxfp4")  # what CPU-tier experts may be stored in (fiddlerc.quant_format)
MXFP4 = "mxfp4"  # kept from an MXFP4 checkpoint (GPT-OSS), never made from other weights
DENSE_QUANTIZED = ("int8", "int4")  # what dense projections may be stored in
COMPUTE = "compute"  # --expert-dtype's name for the compute dtype (Target.expert_dtype None)
EXPERT_DTYPES = (*QUANTIZED, COMPUTE)  # what --expert-dtype accepts
GENERATED, HF = "generated", "hf"  # AttentionLayer.path: fiddlerc's generated attention, or Hugging Face's module


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # e.g. MixtralForCausalLM
    model_type: str  # e.g. mixtral
    dtype: str  # compute dtype of the compiled model
    num_layers: int
    config_sha256: str  # of the config the plan was made for
    hidden_size: int = 0  # width of the activations that cross between the tiers (0: unknown)


@dataclass(frozen=True)
class Target:
    """The machine the plan is for; load() maps it onto the devices that exist."""

    device: str  # the GPU tier, e.g. cuda:0; "cpu": a CPU-only plan, no GPU tier (budget 0, every expert on the CPU)
    budget_bytes: int
    context_tokens: int
    batch_size: int
    fast_experts: int | None  # user override: best N experts on the GPU
    hardware: str | None = None  # hardware profile the plan was priced with (name), if any
    hardware_sha256: str | None = None
    popularity: str | None = None  # measured expert popularity the placement used (file name), if any
    popularity_sha256: str | None = None
    more_gpus: dict[str, int] = field(default_factory=dict)  # further GPUs holding experts only: device -> budget
    # Micro-batching (schedule_overlap): the batch is split into this many micro-batches, and
    # `schedule` orders their stages: "c<mb>.<stage>" runs a stage (up to and with its MoE call,
    # whose CPU experts are submitted), "w<mb>.<stage>" waits for that call's CPU experts.
    micro_batches: int = 1
    schedule: tuple[str, ...] = ()
    # The format cpu-tier experts are stored and computed in (one of QUANTIZED), None: the compute dtype.
    # Experts on a GPU keep the compute dtype and its bytes (ExpertPlacement.bytes).
    expert_dtype: str | None = None
    # The format of the dense projections where they run on the CPU (a CPU-only load), None: the compute dtype.
    dense_dtype: str | None = None
    # Where the budget came from when no --gpu-memory was given (the GPU's free memory at compile time, or no
    # CUDA device: a CPU-only plan); None: the user gave it.
    budget_note: str | None = None

    @property
    def cpu_only(self) -> bool:
        """Whether the plan has no GPU tier: every weight in host memory, every expert on the CPU."""
        return self.device == CPU

    @property
    def quantizes(self) -> bool:
        """Whether the compiled folder holds quantized weights (fiddlerc.model.quantize)."""
        return self.expert_dtype is not None or self.dense_dtype is not None

    def gpus(self) -> tuple[str, ...]:
        """Every GPU of the target, the one with the dense weights first; none for a CPU-only plan."""
        return () if self.cpu_only else (self.device, *self.more_gpus)


@dataclass(frozen=True)
class MoeLayer:
    """One MoE block, as find_experts saw it."""

    layer: int
    block: str  # module path of the MoE block
    experts_module: str  # module path holding its routed experts (the block itself for some families)
    layout: str  # how the block holds its experts (fiddlerc.model.families), e.g. "experts-interface"
    routing: str  # how the router picks experts, e.g. "softmax top-k"
    num_experts: int
    top_k: int
    bytes_per_expert: int
    shared_expert_bytes: int  # dense weights of shared experts in this block (placed with the dense weights)


@dataclass(frozen=True)
class Memory:
    """Bytes on the target GPU: dense weights and the KV reserve first, then experts."""

    budget_bytes: int
    dense_bytes: int  # embeddings, attention, norms, routers, shared experts, lm_head
    kv_reserve_bytes: int
    expert_bytes: dict[str, int] = field(default_factory=dict)  # device -> bytes of experts placed there
    # Host memory: what the run keeps there (CPU-tier experts; every weight and the KV cache when the
    # target is CPU-only) and what the host has for it (--cpu-memory). None: not checked.
    host_bytes: int | None = None
    host_budget_bytes: int | None = None
    host_budget_given: bool = False  # host_budget_bytes is --cpu-memory's (else the hardware profile's memory)
    gpu: str = "cuda:0"  # the GPU `budget_bytes` is for (the target's first: dense weights and KV live there)

    @property
    def paged_fraction(self) -> float:
        """Share of host-resident weight reads that come from disk because host memory is short."""
        if not self.host_bytes or self.host_budget_bytes is None or self.host_budget_bytes >= self.host_bytes:
            return 0.0
        return 1.0 - self.host_budget_bytes / self.host_bytes

    @property
    def free_bytes(self) -> int:
        """What the budget of `gpu` has left after dense weights, KV reserve and the experts on it (0 for a
        CPU-only plan: no GPU budget to leave)."""
        if self.gpu == CPU:
            return 0
        return self.budget_bytes - self.dense_bytes - self.kv_reserve_bytes - self.expert_bytes.get(self.gpu, 0)


@dataclass(frozen=True)
class Prediction:
    """What the cost model predicts for this plan on its hardware profile (decode, batch 1)."""

    decode_ms_per_token: float
    dense_ms: float
    fast_expert_ms: float
    cpu_expert_ms: float
    position: int  # sequence position the prediction is for
    # A simulated decode at that position (fiddlerc.compiler.simulate): ms per token and each resource's busy
    # ms per token (gpu, cpu, h2d, d2h); the report splits the time into GPU, CPU, transfers and idle.
    simulated_ms_per_token: float = 0.0
    busy_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpertPlacement:
    layer: int
    expert: int
    device: str  # "cpu" or one of the target's GPUs
    bytes: int
    expected_use: float  # expected fraction of the layer's routed tokens (top_k / num_experts if uniform)
    reason: str
    fetch_min_tokens: int | None = None  # cpu-tier: from this many tokens in one call, copy the weights to the GPU


@dataclass(frozen=True)
class AttentionLayer:
    """How one decoder layer's attention runs: fiddlerc's generated code or Hugging Face's module."""

    layer: int
    module: str  # module path of the attention
    path: str  # "generated" or "hf"
    reason: str


@dataclass(frozen=True)
class Plan:
    model: ModelInfo
    target: Target
    format_version: int = FORMAT_VERSION
    fiddlerc_version: str = ""
    moe_layers: tuple[MoeLayer, ...] = ()
    memory: Memory | None = None
    experts: tuple[ExpertPlacement, ...] = ()
    prediction: Prediction | None = None
    attention: tuple[AttentionLayer, ...] = ()

    def with_(self, **changes) -> Plan:
        return replace(self, **changes)

    def devices(self) -> tuple[str, ...]:
        """Devices that hold experts, cpu last."""
        used = {e.device for e in self.experts}
        return tuple(sorted(used - {CPU})) + ((CPU,) if CPU in used else ())

    def placement(self, layer: int) -> tuple[str, ...]:
        """Device of each expert of one layer, by expert index."""
        mine = sorted((e for e in self.experts if e.layer == layer), key=lambda e: e.expert)
        return tuple(e.device for e in mine)


def fetches(fetch_min_tokens: int | None, tokens: int) -> bool:
    """The execution policy of a cpu-tier expert (`ExpertPlacement.fetch_min_tokens`): whether a call
    of `tokens` tokens copies the expert's weights to the GPU and computes it there, rather than sending
    the tokens to the CPU. The runtime and the simulator both decide with this."""
    return fetch_min_tokens is not None and tokens >= fetch_min_tokens
