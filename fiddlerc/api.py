"""compile(), plan() and load(): the Python API, and what the CLI calls."""

from __future__ import annotations

import logging
from pathlib import Path

from fiddlerc.artifact import Artifact, build_plan, compile_model
from fiddlerc.compiler.options import CompileOptions, parse_target
from fiddlerc.errors import OptionError
from fiddlerc.hardware import HardwareProfile, load_profile
from fiddlerc.loader import load
from fiddlerc.model.families import find_layout
from fiddlerc.model.folder import open_config, open_model_folder, stored_expert_format
from fiddlerc.model.meta import meta_model_of
from fiddlerc.plan import Plan
from fiddlerc.popularity import load_popularity
from fiddlerc.units import parse_size

__all__ = ["compile", "load", "plan"]

log = logging.getLogger(__name__)


def _profile(hardware: str | Path | None, model, dtype, expert_format: str | None = None) -> HardwareProfile | None:
    """A profile by name or file; "auto" is this machine, calibrated for the model's expert shape in the
    CPU tier's format (cached)."""
    if hardware is None:
        return None
    if str(hardware) != "auto":
        return load_profile(hardware)
    from fiddlerc.tools.calibrate import calibrate

    hidden, inter = expert_shape(model, dtype)
    return calibrate(hidden, inter, dtype, config=model.config, expert_format=expert_format)[0]


def expert_shape(model, dtype) -> tuple[int, int]:
    """(hidden, intermediate) of the model's routed experts, from the first MoE block's weight bytes."""
    hidden = model.config.hidden_size
    for block in model.modules():
        layout = find_layout(block, hidden)
        if layout is not None:
            per_expert = sum(p.numel() for p in layout.expert_params(block).values()) // layout.num_experts(block)
            return hidden, max(1, per_expert // (3 * hidden))
    raise OptionError("the model has no MoE block to calibrate for")


def _inputs(
    folder, gpu_memory, *, fast_experts, context, batch, dtype, hardware, cpu_memory, popularity, micro_batches,
    expert_dtype, dense_dtype,
):  # fmt: skip
    """What planning and compiling share: the meta model, its compute dtype, the target and the options."""
    target = parse_target(
        gpu_memory, fast_experts=fast_experts, context=context, batch=batch, micro_batches=micro_batches,
        expert_dtype=expert_dtype, dense_dtype=dense_dtype, stored_experts=stored_expert_format(folder),
    )  # fmt: skip
    model, compute_dtype = meta_model_of(folder, dtype)
    profile = _profile(hardware, model, compute_dtype, target.expert_dtype)
    if profile is not None and target.cpu_only:  # no GPU tier: priced on the profile's CPU alone
        profile = profile.cpu_side()
    options = CompileOptions(
        hardware=profile,
        popularity=None if popularity is None else load_popularity(popularity),
        cpu_memory_bytes=None if cpu_memory is None else parse_size(cpu_memory),
        micro_batches=micro_batches,
    )
    return model, compute_dtype, target, options


def plan_and_profile(
    config_or_dir: str | Path,
    gpu_memory: str | int | None = None,
    *,
    fast_experts: int | None = None,
    context: int = 4096,
    batch: int = 1,
    dtype: str | None = None,
    hardware: str | Path | None = None,
    cpu_memory: str | int | None = None,
    popularity: str | Path | None = None,
    micro_batches: int | None = None,
    expert_dtype: str | None = None,
    dense_dtype: str | None = None,
) -> tuple[Plan, HardwareProfile | None]:
    """`plan`, and the hardware profile it was priced on (None without `hardware`; a CPU-only plan's is the
    profile's CPU alone), for simulating the plan on the same machine."""
    folder = open_config(config_or_dir)
    inputs = _inputs(folder, gpu_memory, fast_experts=fast_experts, context=context, batch=batch, dtype=dtype,
                     hardware=hardware, cpu_memory=cpu_memory, popularity=popularity, micro_batches=micro_batches,
                     expert_dtype=expert_dtype, dense_dtype=dense_dtype)  # fmt: skip
    return build_plan(folder, *inputs)[1], inputs[3].hardware


def plan(config_or_dir: str | Path, gpu_memory: str | int | None = None, **options) -> Plan:
    """Plan a model from its config.json alone (no weights needed): the placement compile would make,
    priced on `hardware` (a profile name or file, or auto) when given. `gpu_memory` and the other options as
    for `compile`."""
    return plan_and_profile(config_or_dir, gpu_memory, **options)[0]


def compile(  # noqa: A001 - the verb users expect
    model_dir: str | Path,
    out_dir: str | Path,
    gpu_memory: str | int | None = None,
    *,
    fast_experts: int | None = None,
    context: int = 4096,
    batch: int = 1,
    dtype: str | None = None,
    hardware: str | Path | None = None,
    cpu_memory: str | int | None = None,
    popularity: str | Path | None = None,
    micro_batches: int | None = None,
    expert_dtype: str | None = None,
    dense_dtype: str | None = None,
) -> Artifact:
    """Compile a Hugging Face MoE model folder into `out_dir` (plan.json, module.py, sources.json, report.txt,
    manifest.json).

    `gpu_memory` is the target GPU's budget ("24GiB"; several GPUs as "cuda:0=20GiB,cuda:1=10GiB"). None:
    this machine's cuda:0, its free memory now less a margin (the plan records it), or where there is no
    CUDA device a CPU-only plan; 0: a CPU-only plan (every weight in host memory, no GPU tier).

    `hardware` (a profile name or file, or "auto": this machine, calibrated) prices the plan: its
    prediction goes into plan.json and the report. `cpu_memory` is the host memory for the run
    (default: the profile's); CPU-tier weights beyond it page from disk, which the plan records and the
    prediction prices. `popularity` is a JSON of measured routing counts (`fiddlerc popularity`, or the
    Fiddler repository's format): placement weighs each expert by it instead of assuming uniform routing.
    `expert_dtype` ("int8" or "int4") stores the cpu-tier experts quantized in `out_dir` (quantized.safetensors)
    and computes them with fiddlerc's quantized kernels; experts on a GPU keep the compute dtype. An MXFP4
    checkpoint's cpu-tier experts stay MXFP4 ("mxfp4", its default; "compute" dequantizes them). `dense_dtype`
    does the same for the dense projections (attention, shared experts, lm_head), used where they run on the CPU.
    """
    folder = open_model_folder(model_dir)
    inputs = _inputs(folder, gpu_memory, fast_experts=fast_experts, context=context, batch=batch, dtype=dtype,
                     hardware=hardware, cpu_memory=cpu_memory, popularity=popularity, micro_batches=micro_batches,
                     expert_dtype=expert_dtype, dense_dtype=dense_dtype)  # fmt: skip
    return compile_model(folder, *inputs, out_dir)
