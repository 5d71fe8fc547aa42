"""A Hugging Face model folder: its config and the headers of its safetensors files.

Nothing here reads tensor data: opening a folder reads config.json and each file's header, and
checks that the two belong together (fiddlerc.model.weights reads the data, memory-mapped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fiddlerc.errors import ModelFolderError, UnsupportedModelError
from fiddlerc.model.mxfp4 import DEQUANTIZED

log = logging.getLogger(__name__)

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk, from its file's header."""

    file: str  # file name inside the model folder
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int = 0  # byte offset of its data in the file


@dataclass(frozen=True)
class ModelFolder:
    """A checked model folder: its config and the headers of all its safetensors files."""

    path: Path
    config_json: dict
    tensors: dict[str, TensorInfo]  # checkpoint key -> where it is
    files: tuple[str, ...]  # safetensors file names, sorted

    def fingerprint(self) -> dict[str, dict[str, object]]:
        """Per weight file: size and sha256 of its header. Cheap, and changes when any tensor does."""
        out: dict[str, dict[str, object]] = {}
        for name in self.files:
            f = self.path / name
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = fh.read(n)
            out[name] = {"bytes": f.stat().st_size, "header_sha256": hashlib.sha256(header).hexdigest()}
        return out


def _read_header(file: Path) -> tuple[dict, int]:
    """Parse one safetensors header, checking that every tensor's bytes are inside the file; with the
    byte offset where its data starts."""
    size = file.stat().st_size
    fix = f"re-download or re-save {file.name}"
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelFolderError(f"{file} is truncated (no safetensors header): {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise ModelFolderError(f"{file} has a corrupt safetensors header (length {n}): {fix}")
            header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{file} has a corrupt safetensors header ({e}): {fix}") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{file} has a corrupt safetensors header (not a JSON object): {fix}")
    data_bytes = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ModelFolderError(f"{file}: tensor {key!r} has a malformed header entry: {fix}") from None
        if dtype not in ST_DTYPES:
            raise UnsupportedModelError(
                f"{file}: tensor {key!r} has dtype {dtype}, which fiddlerc does not read "
                f"(supported: {', '.join(ST_DTYPES)}); quantized checkpoints are not supported yet"
            )
        numel = 1
        for s in shape:
            numel *= s
        if end > data_bytes or end - begin != numel * ST_DTYPES[dtype].itemsize:
            raise ModelFolderError(
                f"{file} is truncated or corrupt: tensor {key!r} ends at byte {end} of {data_bytes}: {fix}"
            )
    return header, 8 + n


def open_model_folder(path: str | Path) -> ModelFolder:
    """Check a model folder (config.json + safetensors, sharded or not) and read its headers."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"model folder {path} does not exist: give the path of a local Hugging Face model")
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder: give the folder that holds config.json and *.safetensors")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelFolderError(f"{path} has no config.json: is it a Hugging Face model folder? Download it completely")
    config_json = _read_config_json(cfg_file)

    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelFolderError(f"{index_file} is corrupt: re-download it") from None
        for name in files:
            if "/" in name or "\\" in name or not (path / name).is_file():
                raise ModelFolderError(f"{index_file} names shard {name!r}, which is missing: download it")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = (
            f" (found {', '.join(bins[:3])}: pickled weights are not read; convert them to safetensors)" if bins else ""
        )
        raise ModelFolderError(f"{path} has no *.safetensors weights{hint}: download the safetensors files")

    return open_weight_files(path, files, config_json)


def open_weight_files(path: str | Path, files: list[str], config_json: dict | None = None) -> ModelFolder:
    """The safetensors files `files` of the folder `path`, their headers checked (a compiled folder's
    quantized experts are read this way too)."""
    path = Path(path)
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        header, data_start = _read_header(path / name)
        for key, info in header.items():
            if key != "__metadata__":
                offset = data_start + info["data_offsets"][0]
                tensors[key] = TensorInfo(file=name, dtype=info["dtype"], shape=tuple(info["shape"]), offset=offset)
    return ModelFolder(path=path.resolve(), config_json=config_json or {}, tensors=tensors, files=tuple(files))


def open_config(path: str | Path) -> ModelFolder:
    """A config.json (or a folder holding one) without weights: enough to plan a model."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg_file = path if path.is_file() else path / "config.json"
    if not cfg_file.is_file():
        raise ModelFolderError(f"{path} is neither a config.json nor a folder holding one")
    return ModelFolder(path=folder.resolve(), config_json=_read_config_json(cfg_file), tensors={}, files=())


def _read_config_json(cfg_file: Path) -> dict:
    try:
        config_json = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{cfg_file} is not valid JSON ({e}): re-download config.json") from None
    if not isinstance(config_json, dict):
        raise ModelFolderError(f"{cfg_file} is not a JSON object: re-download config.json")
    return config_json


def stored_expert_format(folder: ModelFolder) -> str | None:
    """The quantized format a checkpoint stores its experts in (one of DEQUANTIZED), or None."""
    quant = folder.config_json.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return method if method in DEQUANTIZED else None


def load_config(folder: ModelFolder):
    """The model's transformers config. Remote code is never run: only built-in model types load."""
    from transformers import CONFIG_MAPPING

    model_type = folder.config_json.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"{folder.path}/config.json has model_type {model_type!r}, which this transformers does not know; "
            "fiddlerc runs no remote code: upgrade transformers or use a model type it ships"
        )
    if "auto_map" in folder.config_json:
        log.warning(
            "config.json asks for remote code (auto_map); fiddlerc ignores it and uses the built-in %s", model_type
        )
    quant = folder.config_json.get("quantization_config")
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant and "unknown"
    if quant is not None and method not in DEQUANTIZED:
        raise UnsupportedModelError(
            f"{folder.path} is a quantized checkpoint (quantization_config.quant_method={method!r}); fiddlerc "
            f"dequantizes only {', '.join(DEQUANTIZED)}: use the unquantized (bf16/fp16/fp32) weights of this model"
        )
    # A dequantized model is built unquantized; its experts are dequantized one by one at bind time.
    fields = {k: v for k, v in folder.config_json.items() if k not in ("auto_map", "quantization_config")}
    try:
        config = CONFIG_MAPPING[model_type].from_dict(fields)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ModelFolderError(f"{folder.path}/config.json does not describe a valid {model_type} model: {e}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{model_type} is an encoder-decoder model; fiddlerc compiles decoder-only causal LMs such as "
            f"{supported_names()}"
        )
    return config


def supported_names() -> str:
    from fiddlerc.model.families import VERIFIED

    return ", ".join(VERIFIED.values())


def checkpoint_dtype(folder: ModelFolder, config) -> torch.dtype:
    """The dtype the checkpoint declares (config `dtype`/`torch_dtype`), else that of its weights."""
    declared = getattr(config, "dtype", None) or folder.config_json.get("torch_dtype")
    if isinstance(declared, torch.dtype):
        return declared
    if isinstance(declared, str) and hasattr(torch, declared):
        return getattr(torch, declared)
    floats = [ST_DTYPES[t.dtype] for t in folder.tensors.values() if ST_DTYPES[t.dtype].is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32
