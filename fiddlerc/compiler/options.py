"""Compile inputs, parsed once, validated, frozen.

The target's numbers (GPU budgets, devices, context, batch, a forced expert count) have one home:
`plan.target` (fiddlerc.plan.Target); `parse_target` checks what the user wrote and builds it.
`CompileOptions` holds the rest: what the plan is priced and weighed with, and the requests the
passes decide on.
"""

from __future__ import annotations

from dataclasses import dataclass

from fiddlerc.errors import OptionError
from fiddlerc.hardware import HardwareProfile
from fiddlerc.plan import COMPUTE, CPU, DENSE_QUANTIZED, EXPERT_DTYPES, MXFP4, Target, is_gpu_name
from fiddlerc.popularity import Popularity
from fiddlerc.units import format_size, parse_size

# Without --gpu-memory, a plan for this machine's cuda:0 takes its free memory at compile time less this
# margin, for what the run needs beside the plan's weights: the CUDA context (~0.5 GiB), activations and
# the caching allocator's slack (vLLM's default gpu_memory_utilization of 0.9 leaves the same 10 %).
GPU_MARGIN_FRACTION = 0.10
GPU_MARGIN_MIN_BYTES = 2**30


@dataclass(frozen=True)
class CompileOptions:
    hardware: HardwareProfile | None = None  # prices the plan (predict_speed); None: no prediction
    popularity: Popularity | None = None  # measured routing counts (--popularity); None: uniform
    cpu_memory_bytes: int | None = None  # host memory for the run (--cpu-memory); None: the profile's, if any
    micro_batches: int | None = None  # requested micro-batches; None: the cost model decides (schedule_overlap)

    def __post_init__(self) -> None:
        if self.cpu_memory_bytes is not None and self.cpu_memory_bytes < 0:
            raise OptionError("--cpu-memory cannot be negative")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise OptionError(f"--micro-batches must be at least 1, got {self.micro_batches}")


def parse_gpu_memory(text: str | int) -> list[tuple[str, int]]:
    """`24GiB` (one GPU, cuda:0) or `cuda:0=20GiB,cuda:1=10GiB` (the first holds the dense weights)."""
    if isinstance(text, int) or "=" not in str(text):
        return [("cuda:0", parse_size(text))]
    out: list[tuple[str, int]] = []
    for part in str(text).split(","):
        dev, _, size = part.strip().partition("=")
        dev = dev.strip()
        if not is_gpu_name(dev):
            raise OptionError(
                f"invalid --gpu-memory part {part.strip()!r}: write cuda:N=SIZE, e.g. cuda:0=20GiB,cuda:1=10GiB"
            )
        if dev in (d for d, _ in out):
            raise OptionError(f"--gpu-memory names {dev} twice")
        out.append((dev, parse_size(size)))
    return out


def default_gpu_budget() -> tuple[list[tuple[str, int]], str]:
    """The target GPUs when no --gpu-memory is given, and a note saying how they were chosen: cuda:0's free
    memory now less the margin where CUDA is present, else none (a CPU-only plan)."""
    import torch

    if not torch.cuda.is_available():
        return [], "no --gpu-memory and no CUDA device at compile time"
    free, total = torch.cuda.mem_get_info(0)
    margin = max(GPU_MARGIN_MIN_BYTES, int(total * GPU_MARGIN_FRACTION))
    budget = max(0, free - margin)
    note = (
        f"no --gpu-memory: {format_size(free)} free of {format_size(total)} on cuda:0 "
        f"({torch.cuda.get_device_name(0)}) at compile time, less a margin of {format_size(margin)} "
        f"({GPU_MARGIN_FRACTION:.0%} of its memory, at least {format_size(GPU_MARGIN_MIN_BYTES)})"
    )
    return [("cuda:0", budget)], note


def expert_format(requested: str | None, stored: str | None) -> str | None:
    """The cpu-tier experts' format (None: the compute dtype) for --expert-dtype `requested` on a checkpoint
    whose experts are stored in `stored`."""
    if requested == COMPUTE:
        return None
    if stored == MXFP4:
        if requested not in (None, MXFP4):
            raise OptionError(
                f"--expert-dtype {requested}: this checkpoint's experts are MXFP4 already (4.25 bits per weight), "
                "and run so on the CPU by default; quantizing them again would only lose accuracy. Leave "
                f"--expert-dtype out, or give --expert-dtype {COMPUTE} to dequantize them exactly"
            )
        return MXFP4
    if requested == MXFP4:
        raise OptionError(
            "--expert-dtype mxfp4 keeps an MXFP4 checkpoint's experts as they are, and this checkpoint's are not "
            "MXFP4: choose int8 or int4"
        )
    return requested


def parse_target(
    gpu_memory: str | int | None,
    *,
    fast_experts: int | None = None,
    context: int = 4096,
    batch: int = 1,
    micro_batches: int | None = None,
    expert_dtype: str | None = None,
    dense_dtype: str | None = None,
    stored_experts: str | None = None,
) -> Target:
    """The target the user described: its GPUs with their budgets (the first holds the dense weights, the
    KV reserve and experts; the others experts only), the KV-cache reserve of `context` tokens x `batch`
    sequences, and `fast_experts` (force the best N experts onto the GPUs, checked against the budget).
    `micro_batches` is checked against `batch` here; it travels in CompileOptions. `expert_dtype` (int8,
    int4) stores and computes the cpu-tier experts quantized (fiddlerc.quant_format), `dense_dtype` the dense
    projections where they run on the CPU. `stored_experts` is the checkpoint's own expert format (mxfp4, or
    None): its experts stay in it by default, and `expert_dtype="compute"` dequantizes them instead.
    `gpu_memory` None: `default_gpu_budget`; 0 (one GPU of no memory): a CPU-only plan, no GPU tier."""
    note = None
    if gpu_memory is None:
        gpus, note = default_gpu_budget()
    else:
        gpus = parse_gpu_memory(gpu_memory)
        if gpus == [("cuda:0", 0)]:
            gpus = []
    if fast_experts is not None and fast_experts < 0:
        raise OptionError(f"--fast-experts must be >= 0, got {fast_experts}")
    if context <= 0:
        raise OptionError(f"--context must be a positive number of tokens, got {context}")
    if batch <= 0:
        raise OptionError(f"--batch must be a positive number of sequences, got {batch}")
    if micro_batches is not None and not 1 <= micro_batches <= batch:
        raise OptionError(f"--micro-batches must be between 1 and --batch ({batch}), got {micro_batches}")
    if expert_dtype is not None and expert_dtype not in EXPERT_DTYPES:
        raise OptionError(f"--expert-dtype {expert_dtype!r} is not one of {', '.join(EXPERT_DTYPES)}")
    if dense_dtype is not None and dense_dtype not in DENSE_QUANTIZED:
        raise OptionError(f"--dense-dtype {dense_dtype!r} is not one of {', '.join(DENSE_QUANTIZED)}")
    expert_dtype = expert_format(expert_dtype, stored_experts)
    if not gpus and fast_experts:
        why = "--gpu-memory 0" if note is None else "no CUDA device here and no --gpu-memory"
        raise OptionError(
            f"--fast-experts {fast_experts} needs a GPU tier, and this plan has none ({why}): give --gpu-memory "
            "for the target GPU, or leave --fast-experts out"
        )
    (device, budget), *more = gpus or [(CPU, 0)]
    return Target(
        device=device,
        budget_bytes=budget,
        context_tokens=context,
        batch_size=batch,
        fast_experts=fast_experts,
        more_gpus=dict(more),
        expert_dtype=expert_dtype,
        dense_dtype=dense_dtype,
        budget_note=note,
    )
