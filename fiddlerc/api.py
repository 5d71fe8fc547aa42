"""compile() and load(): the Python API, and what the CLI calls."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from fiddlerc.artifact import MANIFEST_FILE, MODULE_FILE, PLAN_FILE, SOURCES_FILE, Artifact, make_manifest
from fiddlerc.compiler.capture import capture
from fiddlerc.compiler.codegen import generate_module
from fiddlerc.compiler.options import CompileOptions, parse_gpu_memory
from fiddlerc.compiler.pipeline import initial_plan, run_passes
from fiddlerc.compiler.report import report_text
from fiddlerc.errors import OptionError
from fiddlerc.hardware import HardwareProfile, load_profile
from fiddlerc.loader import load
from fiddlerc.model.folder import checkpoint_dtype, load_config, open_config, open_model_folder
from fiddlerc.model.meta import build_meta_model
from fiddlerc.model.weights import resolve_sources, sources_to_json
from fiddlerc.plan import Plan, plan_to_json
from fiddlerc.popularity import load_popularity
from fiddlerc.units import dtype_name, parse_dtype, parse_size

__all__ = ["compile", "load", "plan"]

log = logging.getLogger(__name__)
REPORT_FILE = "report.txt"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _profile(hardware: str | Path | None, model, dtype) -> HardwareProfile | None:
    """A profile by name or file; "auto" is this machine, calibrated for the model's expert shape (cached)."""
    if hardware is None:
        return None
    if str(hardware) != "auto":
        return load_profile(hardware)
    from fiddlerc.tools.calibrate import calibrate

    hidden, inter = expert_shape(model, dtype)
    return calibrate(hidden, inter, dtype, config=model.config)[0]


def expert_shape(model, dtype) -> tuple[int, int]:
    """(hidden, intermediate) of the model's routed experts, from the first MoE block's weight bytes."""
    from fiddlerc.model.families import find_layout

    hidden = model.config.hidden_size
    for block in model.modules():
        layout = find_layout(block, hidden)
        if layout is not None:
            per_expert = sum(p.numel() for p in layout.expert_params(block).values()) // layout.num_experts(block)
            return hidden, max(1, per_expert // (3 * hidden))
    raise OptionError("the model has no MoE block to calibrate for")


def plan(
    config_or_dir: str | Path,
    gpu_memory: str | int,
    *,
    fast_experts: int | None = None,
    context: int = 4096,
    batch: int = 1,
    dtype: str | None = None,
    hardware: str | Path | None = None,
    cpu_memory: str | int | None = None,
    popularity: str | Path | None = None,
    micro_batches: int | None = None,
) -> Plan:
    """Plan a model from its config.json alone (no weights needed): the placement compile would make,
    priced on `hardware` (a profile name or file) when given."""
    folder = open_config(config_or_dir)
    model, dtype_, options = _prepare(
        folder,
        gpu_memory,
        fast_experts=fast_experts,
        context=context,
        batch=batch,
        dtype=dtype,
        hardware=hardware,
        cpu_memory=cpu_memory,
        popularity=popularity,
        micro_batches=micro_batches,
    )
    return run_passes(capture(model), initial_plan(model, folder.config_json, dtype_, options), options)


def _prepare(
    folder, gpu_memory, *, fast_experts, context, batch, dtype, hardware, cpu_memory, popularity, micro_batches
):
    """The meta model, its compute dtype and the checked options: what planning and compiling share."""
    gpus = parse_gpu_memory(gpu_memory)
    options = CompileOptions(
        popularity=None if popularity is None else load_popularity(popularity),
        target_device=gpus[0][0],
        gpu_budget_bytes=gpus[0][1],
        more_gpus=tuple(gpus[1:]),
        micro_batches=micro_batches,
        cpu_memory_bytes=None if cpu_memory is None else parse_size(cpu_memory),
        fast_experts=fast_experts,
        context_tokens=context,
        batch_size=batch,
        dtype=dtype,
    )
    config = load_config(folder)
    compute_dtype = parse_dtype(dtype) if dtype else checkpoint_dtype(folder, config)
    dtype_name(compute_dtype)  # refuses a checkpoint dtype fiddlerc does not compute in
    model = build_meta_model(config, compute_dtype)
    return model, compute_dtype, replace(options, hardware=_profile(hardware, model, compute_dtype))


def compile(  # noqa: A001 - the verb users expect
    model_dir: str | Path,
    out_dir: str | Path,
    gpu_memory: str | int,
    *,
    fast_experts: int | None = None,
    context: int = 4096,
    batch: int = 1,
    dtype: str | None = None,
    hardware: str | Path | None = None,
    cpu_memory: str | int | None = None,
    popularity: str | Path | None = None,
    micro_batches: int | None = None,
) -> Artifact:
    """Compile a Hugging Face MoE model folder into `out_dir` (plan.json, module.py, manifest.json, report.txt).

    `hardware` (a profile name or file) prices the plan: its prediction goes into plan.json and the report.
    `cpu_memory` is the host memory for the run (default: the profile's); CPU-tier weights beyond it
    page from disk, which the plan records and the prediction prices. `popularity` is a JSON of
    measured routing counts (`fiddlerc profile`, or the Fiddler repository's format): placement
    weighs each expert by it instead of assuming uniform routing.
    """
    folder = open_model_folder(model_dir)
    model, compute_dtype, options = _prepare(
        folder,
        gpu_memory,
        fast_experts=fast_experts,
        context=context,
        batch=batch,
        dtype=dtype,
        hardware=hardware,
        cpu_memory=cpu_memory,
        popularity=popularity,
        micro_batches=micro_batches,
    )
    sources_text = sources_to_json(resolve_sources(model, folder))  # every weight present, right shape: fail now
    gm = capture(model)
    plan = run_passes(gm, initial_plan(model, folder.config_json, compute_dtype, options), options)
    module_text = generate_module(gm, plan)
    plan_text = plan_to_json(plan)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OptionError(f"output {out} exists and is not a folder: choose another -o")
    if out.resolve() == folder.path:
        raise OptionError("the output folder must not be the model folder: choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(plan, plan_text, module_text, sources_text, folder)
    _write_atomic(out / PLAN_FILE, plan_text)
    _write_atomic(out / MODULE_FILE, module_text)
    _write_atomic(out / SOURCES_FILE, sources_text)
    _write_atomic(out / REPORT_FILE, report_text(plan))
    _write_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")  # last: marks completion
    log.info("compiled %s -> %s", folder.path, out)
    return Artifact(out, plan, manifest, folder, module_text)
