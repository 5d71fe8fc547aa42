"""The compiled folder: its file names, the manifest, writing one, and verifying one before it runs.

A compiled folder holds plan.json, module.py, sources.json, report.txt and manifest.json (written
last: it marks the folder complete). Nothing from a compiled folder is executed unless it equals
what this fiddlerc generates from the plan: `verify_artifact` regenerates module.py from the plan
and a fresh capture of the model (which is why this module sits above the compiler), and checks
every hash and the weight files' headers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
from torch import nn

from fiddlerc.compiler.capture import capture
from fiddlerc.compiler.codegen import generate_module
from fiddlerc.compiler.options import CompileOptions
from fiddlerc.compiler.pipeline import config_sha256, initial_plan, run_passes
from fiddlerc.compiler.report import report_text
from fiddlerc.errors import ArtifactError, OptionError
from fiddlerc.files import write_atomic
from fiddlerc.model.folder import ModelFolder, load_config, open_model_folder, open_weight_files
from fiddlerc.model.meta import build_meta_model
from fiddlerc.model.quantize import QUANTIZED_FILE, QuantizedWeights
from fiddlerc.model.weights import resolve_sources, sources_from_json, sources_to_json
from fiddlerc.plan import Plan, Target
from fiddlerc.plan_file import plan_from_json, plan_to_json
from fiddlerc.units import parse_dtype
from fiddlerc.version import __version__

log = logging.getLogger(__name__)

PLAN_FILE, MODULE_FILE, MANIFEST_FILE = "plan.json", "module.py", "manifest.json"
SOURCES_FILE = "sources.json"  # where each weight is in the model folder (transformers' conversion rules, resolved)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def software_versions() -> dict[str, str]:
    import transformers

    return {"fiddlerc": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def make_manifest(
    plan: Plan,
    plan_text: str,
    module_text: str,
    sources_text: str,
    folder: ModelFolder,
    out: Path,
    quantized_sha256: str | None = None,
) -> dict:
    """What `verify_artifact` checks: the versions that wrote the folder, its files' hashes, the model's
    weights (headers and sizes) and, where the plan quantizes weights, the same for QUANTIZED_FILE."""
    quantized = {}
    if plan.target.quantizes:
        quantized = {"quantized": quantized_fingerprint(out), "quantized_sha256": quantized_sha256}
    return {
        **quantized,
        "versions": software_versions(),
        "model_dir": str(folder.path),
        "files": {
            PLAN_FILE: sha256_bytes(plan_text.encode()),
            MODULE_FILE: sha256_bytes(module_text.encode()),
            SOURCES_FILE: sha256_bytes(sources_text.encode()),
        },
        "weights": folder.fingerprint(),
        "hardware": None
        if plan.target.hardware is None
        else {"name": plan.target.hardware, "sha256": plan.target.hardware_sha256},
    }


def quantized_fingerprint(out: Path) -> dict:
    """Size and header hash of a compiled folder's quantized experts: cheap, and changes when any tensor's
    place or shape does. `fiddlerc verify` reads every byte."""
    return open_weight_files(out, [QUANTIZED_FILE]).fingerprint()


def regenerate_module(folder: ModelFolder, plan: Plan) -> tuple[str, nn.Module]:
    """module.py text for a plan, from a fresh capture of the model (and that meta model)."""
    config = load_config(folder)
    if config_sha256(folder.config_json) != plan.model.config_sha256:
        raise ArtifactError(f"{folder.path}/config.json changed since this model was compiled: recompile")
    model = build_meta_model(config, parse_dtype(plan.model.dtype))
    gm = capture(model)
    return generate_module(gm, plan), model


def read_manifest(data: bytes, where: Path | str = MANIFEST_FILE) -> dict:
    """Parse manifest.json, checking its shape; any malformed input is an ArtifactError."""
    try:
        manifest = json.loads(data)
        ok = isinstance(manifest, dict) and all(
            isinstance(manifest.get(k), t)
            for k, t in (("files", dict), ("versions", dict), ("model_dir", str), ("weights", dict))
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        ok = False
    if not ok:
        raise ArtifactError(f"{where} is corrupt: recompile")
    return manifest


@dataclass(frozen=True)
class Artifact:
    """A verified compiled folder."""

    path: Path
    plan: Plan
    manifest: dict
    folder: ModelFolder
    module_text: str
    sources: dict | None = None  # parameter name -> its Source in the model folder (sources.json)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: {what}; recompile with `fiddlerc compile`") from None


def _open_compiled(out: Path) -> dict:
    """The manifest of compiled folder `out`, or an error that says what `out` is and what to do."""
    if not out.is_dir():
        raise ArtifactError(f"{out} is not a compiled folder (run `fiddlerc compile MODEL_DIR -o {out}` first)")
    if not (out / MANIFEST_FILE).is_file() and (out / "config.json").is_file():
        raise ArtifactError(
            f"{out} is a model folder, not a compiled one: compile it first (`fiddlerc compile {out} -o OUT`), "
            "then give OUT"
        )
    return read_manifest(_read(out / MANIFEST_FILE, "the compiled folder is incomplete"), out / MANIFEST_FILE)


def read_plan(out_dir: str | Path) -> Plan:
    """The plan of a compiled folder, checked against its manifest (without the model's weights: what to
    load it on can be decided from it before `verify_artifact`)."""
    out = Path(out_dir)
    manifest = _open_compiled(out)
    plan_bytes = _read(out / PLAN_FILE, "the compiled folder is incomplete")
    if sha256_bytes(plan_bytes) != manifest["files"].get(PLAN_FILE):
        raise ArtifactError(f"{out / PLAN_FILE} was changed after compiling (hash mismatch): recompile")
    return plan_from_json(plan_bytes)


def verify_artifact(out_dir: str | Path, model_dir: str | Path | None = None) -> tuple[Artifact, nn.Module]:
    """Check a compiled folder against its manifest, its model's weights and a fresh codegen."""
    out = Path(out_dir)
    manifest = _open_compiled(out)
    files, versions, recorded_dir, weights = (
        manifest["files"],
        manifest["versions"],
        manifest["model_dir"],
        manifest["weights"],
    )

    now = software_versions()
    for name in ("fiddlerc", "torch", "transformers"):  # each shapes the generated code
        if versions.get(name) != now[name]:
            raise ArtifactError(
                f"{out} was compiled with {name} {versions.get(name)}, this is {now[name]}: recompile it with this version"
            )
    plan_bytes = _read(out / PLAN_FILE, "the compiled folder is incomplete")
    if sha256_bytes(plan_bytes) != files.get(PLAN_FILE):
        raise ArtifactError(f"{out / PLAN_FILE} was changed after compiling (hash mismatch): recompile")
    plan = plan_from_json(plan_bytes)

    folder = open_model_folder(model_dir if model_dir is not None else recorded_dir)
    if folder.fingerprint() != weights:
        raise ArtifactError(
            f"the weights in {folder.path} are not the ones {out} was compiled for (safetensors headers differ): recompile"
        )
    module_text, meta_model = regenerate_module(folder, plan)
    on_disk = _read(out / MODULE_FILE, "the compiled folder is incomplete")
    if on_disk != module_text.encode() or sha256_bytes(on_disk) != files.get(MODULE_FILE):
        raise ArtifactError(
            f"{out / MODULE_FILE} differs from what this fiddlerc generates from plan.json (edited?); "
            "it was not run: recompile"
        )
    sources_bytes = _read(out / SOURCES_FILE, "the compiled folder is incomplete")
    if sha256_bytes(sources_bytes) != files.get(SOURCES_FILE):
        raise ArtifactError(f"{out / SOURCES_FILE} was changed after compiling (hash mismatch): recompile")
    sources = sources_from_json(sources_bytes, meta_model, folder)
    if plan.target.quantizes:
        if not (out / QUANTIZED_FILE).is_file():
            raise ArtifactError(
                f"{out / QUANTIZED_FILE} is missing: the quantized experts; recompile with `fiddlerc compile`"
            )
        if quantized_fingerprint(out) != manifest.get("quantized"):
            raise ArtifactError(
                f"{out / QUANTIZED_FILE} was changed after compiling (size or header differ): recompile"
            )
    return Artifact(out, plan, manifest, folder, module_text, sources), meta_model


def verify_all(out_dir: str | Path, model_dir: str | Path | None = None) -> Artifact:
    """`verify_artifact`, and every byte of the quantized weights against the hash written with them
    (`fiddlerc verify`): what loading checks cheaply (sizes and headers), read in full."""
    artifact, _ = verify_artifact(out_dir, model_dir)
    if artifact.plan.target.quantizes:
        path = artifact.path / QUANTIZED_FILE
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(64 * 2**20):
                digest.update(chunk)
        if digest.hexdigest() != artifact.manifest.get("quantized_sha256"):
            raise ArtifactError(f"{path} differs from what was compiled (sha256 of its bytes): recompile")
    return artifact


# ---------------------------------------------------------------------------------------------
# Writing one


REPORT_FILE = "report.txt"


def build_plan(
    folder: ModelFolder, model: nn.Module, dtype: torch.dtype, target: Target, options: CompileOptions
) -> tuple[torch.fx.GraphModule, Plan]:
    """The captured graph of `model` (the meta model of `folder`) and its finished plan."""
    gm = capture(model)
    return gm, run_passes(gm, initial_plan(model, folder.config_json, dtype, target, options), options)


def compile_model(
    folder: ModelFolder,
    model: nn.Module,
    dtype: torch.dtype,
    target: Target,
    options: CompileOptions,
    out_dir: str | Path,
) -> Artifact:
    """Compile the meta model of `folder` for `target` into `out_dir`: plan.json, module.py, sources.json,
    report.txt, and manifest.json last (it marks the folder complete). Every weight is checked present
    and of the right shape before anything is written."""
    sources = resolve_sources(model, folder)
    sources_text = sources_to_json(sources)
    gm, plan = build_plan(folder, model, dtype, target, options)
    quantized = QuantizedWeights(model, folder, sources, plan) if plan.target.quantizes else None
    module_text = generate_module(gm, plan)
    plan_text = plan_to_json(plan)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OptionError(f"output {out} exists and is not a folder: choose another -o")
    if out.resolve() == folder.path:
        raise OptionError("the output folder must not be the model folder: choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # the folder is incomplete until the new one is written
    digest = None
    if quantized is not None:
        digest = quantized.write(out)
    else:
        (out / QUANTIZED_FILE).unlink(missing_ok=True)
    manifest = make_manifest(plan, plan_text, module_text, sources_text, folder, out, digest)
    write_atomic(out / PLAN_FILE, plan_text)
    write_atomic(out / MODULE_FILE, module_text)
    write_atomic(out / SOURCES_FILE, sources_text)
    write_atomic(out / REPORT_FILE, report_text(plan))
    write_atomic(out / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log.info("compiled %s -> %s", folder.path, out)
    return Artifact(out, plan, manifest, folder, module_text)
