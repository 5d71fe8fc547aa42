"""A Hugging Face model folder: config, safetensors headers, a meta-device model, memory-mapped weights.

Nothing here reads tensor data except `WeightReader.get`, which memory-maps it (safetensors) so a
weight is never loaded twice and never copied into a compiled folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fiddlerc.errors import ArtifactError, ModelFolderError, UnsupportedModelError
from fiddlerc.quant import DEQUANTIZED, Mxfp4Source, mxfp4_shape

log = logging.getLogger(__name__)

_ST_DTYPES = {
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
        if dtype not in _ST_DTYPES:
            raise UnsupportedModelError(
                f"{file}: tensor {key!r} has dtype {dtype}, which fiddlerc does not read "
                f"(supported: {', '.join(_ST_DTYPES)}); quantized checkpoints are not supported yet"
            )
        numel = 1
        for s in shape:
            numel *= s
        if end > data_bytes or end - begin != numel * _ST_DTYPES[dtype].itemsize:
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

    tensors: dict[str, TensorInfo] = {}
    for name in files:
        header, data_start = _read_header(path / name)
        for key, info in header.items():
            if key != "__metadata__":
                offset = data_start + info["data_offsets"][0]
                tensors[key] = TensorInfo(file=name, dtype=info["dtype"], shape=tuple(info["shape"]), offset=offset)
    return ModelFolder(path=path.resolve(), config_json=config_json, tensors=tensors, files=tuple(files))


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
    from fiddlerc.families import VERIFIED

    return ", ".join(VERIFIED.values())


def checkpoint_dtype(folder: ModelFolder, config) -> torch.dtype:
    """The dtype the checkpoint declares (config `dtype`/`torch_dtype`), else that of its weights."""
    declared = getattr(config, "dtype", None) or folder.config_json.get("torch_dtype")
    if isinstance(declared, torch.dtype):
        return declared
    if isinstance(declared, str) and hasattr(torch, declared):
        return getattr(torch, declared)
    floats = [_ST_DTYPES[t.dtype] for t in folder.tensors.values() if _ST_DTYPES[t.dtype].is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device but buffers for real (rotary tables are computed in __init__)."""
    register = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(self, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        with torch.device("cpu"):
            yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The Hugging Face causal LM with every parameter on the meta device: no weight memory at all."""
    from transformers import AutoModelForCausalLM

    try:
        with _parameters_on_meta():
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
            except ValueError as e:
                if "scaled_dot_product_attention" not in str(e):
                    raise
                # as from_pretrained does: eager attention where SDPA is not supported (e.g. GPT-OSS)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    except ValueError as e:
        raise UnsupportedModelError(
            f"{config.model_type} is not a causal language model transformers can build: {e}"
        ) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# Where each model parameter comes from on disk.


@dataclass(frozen=True)
class DirectSource:
    """The parameter is one checkpoint tensor (perhaps renamed)."""

    key: str


@dataclass(frozen=True)
class PerExpertSource:
    """A fused [E, ...] experts parameter stored on disk as one tensor per expert and part.

    `keys[e]` lists the checkpoint keys of expert e, in the order they are concatenated along
    dim 1 of the expert's slice (gate then up for a fused gate_up_proj).
    """

    keys: tuple[tuple[str, ...], ...]


Source = DirectSource | PerExpertSource | Mxfp4Source


def _transformers_conversions(model: nn.Module):
    """transformers' own rename/merge rules for this model (how its checkpoints map to its parameters)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise UnsupportedModelError(
            f"this transformers has no checkpoint conversion rules fiddlerc can read ({e})"
        ) from None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def understood(c) -> bool:  # stack experts along dim 0, optionally concatenate parts along dim 1
        ops = c.operations
        if [type(op) for op in ops] not in ([MergeModulelist], [MergeModulelist, Concatenate]):
            return False
        return ops[0].dim == 0 and (len(ops) == 1 or ops[1].dim == 1)

    unsupported = {id(c) for c in converters if not understood(c)}
    return renamings, converters, unsupported, rename_source_key


_EXPERT_INDEX_RE = re.compile(r"\.(\d+)\.")


def resolve_sources(model: nn.Module, folder: ModelFolder) -> dict[str, Source]:
    """Map every parameter name of `model` to where its data is on disk.

    Uses transformers' conversion rules, so checkpoints with per-expert keys
    (`experts.0.w1.weight`) and fused ones (`experts.gate_up_proj`) both resolve.
    """
    renamings, converters, unsupported, rename = _transformers_conversions(model)
    meta_state = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)
    direct: dict[str, str] = {}
    per_expert: dict[str, dict[int, dict[int, str]]] = {}
    for key in sorted(folder.tensors):
        target, pattern = rename(key, renamings, converters, prefix, meta_state)
        if pattern is None:
            direct.setdefault(target, key)
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        if id(conv) in unsupported:
            raise UnsupportedModelError(
                f"checkpoint key {key!r} needs a weight conversion fiddlerc does not support yet ({conv!r})"
            )
        m = _EXPERT_INDEX_RE.search(key[key.rfind("experts") :]) if "experts" in key else None
        if m is None:
            raise UnsupportedModelError(f"cannot tell which expert checkpoint key {key!r} belongs to")
        slot = list(conv.source_patterns).index(pattern)
        per_expert.setdefault(target, {}).setdefault(int(m.group(1)), {})[slot] = key

    sources: dict[str, Source] = {}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in direct:
            sources[name] = DirectSource(direct[name])
        elif name in per_expert:
            experts = per_expert[name]
            n = param.shape[0]
            if sorted(experts) != list(range(n)) or any(len(v) != len(experts[0]) for v in experts.values()):
                raise ModelFolderError(
                    f"{folder.path}: the checkpoint holds an incomplete set of experts for {name} "
                    f"(found {len(experts)} of {n}): re-download the model"
                )
            sources[name] = PerExpertSource(tuple(tuple(experts[e][s] for s in sorted(experts[e])) for e in range(n)))
        elif f"{name}_blocks" in direct and f"{name}_scales" in direct:  # MXFP4 experts
            sources[name] = Mxfp4Source(direct[f"{name}_blocks"], direct[f"{name}_scales"])
        elif name in tied and tied[name] in direct:
            sources[name] = DirectSource(direct[tied[name]])
        else:
            raise ModelFolderError(
                f"{folder.path}: the checkpoint lacks tensor {name!r} (shape {tuple(param.shape)}): "
                "the download is incomplete or the weights belong to another model"
            )
    for name, _ in model.named_buffers():  # persistent buffers stored in the checkpoint (e.g. router biases)
        if name in direct:
            sources[name] = DirectSource(direct[name])
    _check_shapes(model, folder, sources)
    return sources


def sources_to_json(sources: dict[str, Source]) -> str:
    """The resolved sources as JSON (sorted, so the same model gives the same bytes)."""
    doc = {}
    for name, src in sources.items():
        if isinstance(src, DirectSource):
            doc[name] = {"key": src.key}
        elif isinstance(src, PerExpertSource):
            doc[name] = {"per_expert": [list(keys) for keys in src.keys]}
        else:
            doc[name] = {"mxfp4": [src.blocks, src.scales]}
    return json.dumps(doc, indent=0, sort_keys=True) + "\n"


def sources_from_json(text: bytes, model: nn.Module, folder: ModelFolder) -> dict[str, Source]:
    """Sources written by `sources_to_json` at compile time, checked against the model and its folder as
    `resolve_sources` checks them (every parameter has one, every key is in the files, shapes agree).
    Spares the load transformers' conversion rules (~0.5 s to build in a fresh process here)."""
    try:
        doc = json.loads(text)
        sources: dict[str, Source] = {}
        for name, entry in doc.items():
            if "key" in entry:
                sources[name] = DirectSource(str(entry["key"]))
            elif "per_expert" in entry:
                sources[name] = PerExpertSource(tuple(tuple(str(k) for k in keys) for keys in entry["per_expert"]))
            else:
                blocks, scales = entry["mxfp4"]
                sources[name] = Mxfp4Source(str(blocks), str(scales))
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ArtifactError("the compiled folder's sources.json is corrupt: recompile") from None
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    keys = {k for src in sources.values() for k in _keys_of(src)}
    if (
        not names <= set(sources)
        or not keys <= set(folder.tensors)
        or not set(sources) <= names | {n for n, _ in model.named_buffers()}
    ):
        raise ArtifactError("the compiled folder's sources.json does not match the model and its weights: recompile")
    _check_shapes(model, folder, sources)
    return sources


def _keys_of(src: Source) -> tuple[str, ...]:
    if isinstance(src, DirectSource):
        return (src.key,)
    if isinstance(src, PerExpertSource):
        return sum(src.keys, ())
    return (src.blocks, src.scales)


def _check_shapes(model: nn.Module, folder: ModelFolder, sources: dict[str, Source]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(model.named_buffers())
    for name, src in sources.items():
        want = tuple(params[name].shape)
        if isinstance(src, DirectSource):
            got = folder.tensors[src.key].shape
            bad = got != want
            shown = src.key
        elif isinstance(src, Mxfp4Source):
            got = mxfp4_shape(folder.tensors[src.blocks].shape)
            transposed = (*got[:-2], got[-1], got[-2])
            bad = (
                want not in (got, transposed)
                or folder.tensors[src.scales].shape != folder.tensors[src.blocks].shape[:-1]
            )
            shown = src.blocks
            if not bad:
                continue
        else:
            parts = [folder.tensors[k].shape for k in src.keys[0]]
            got = (len(src.keys), sum(p[0] for p in parts), *parts[0][1:])
            bad = got != want or any(len(p) != len(want) - 1 for p in parts)
            shown = src.keys[0][0]
        if bad:
            raise ModelFolderError(
                f"{folder.path}: tensor {shown!r} has shape {got}, but config.json implies {want} for {name}: "
                "config.json and the weights do not belong together"
            )
        dtypes = {folder.tensors[k].dtype for k in ((src.key,) if isinstance(src, DirectSource) else sum(src.keys, ()))}
        if not all(_ST_DTYPES[d].is_floating_point for d in dtypes):
            raise ModelFolderError(f"{folder.path}: tensor {shown!r} has dtype {dtypes}, expected a float dtype")


class WeightReader:
    """Private memory maps of a folder's safetensors files, each mapped once; tensors are views of
    them, so nothing is read until it is used. `release` hands a tensor's pages back to the kernel
    (after a copy of it was made, so that resident memory holds the weight once)."""

    def __init__(self, folder: ModelFolder) -> None:
        self.folder = folder
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}  # file -> (map, its address)

    def _map(self, file: str) -> tuple[mmap.mmap, int]:
        if file not in self._maps:
            with open(self.folder.path / file, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private: a write never reaches the file
            base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
            self._maps[file] = (mm, base)
        return self._maps[file]

    def get(self, key: str) -> torch.Tensor:
        info = self.folder.tensors[key]
        dtype = _ST_DTYPES[info.dtype]
        numel = math.prod(info.shape)
        if numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        mm, _ = self._map(info.file)
        return torch.frombuffer(mm, dtype=dtype, count=numel, offset=info.offset).view(info.shape)

    def maps(self, t: torch.Tensor) -> bool:
        """Whether `t`'s bytes lie in one of these maps (a view of a file, not a copy)."""
        return self._map_of(t) is not None

    def _map_of(self, t: torch.Tensor) -> tuple[mmap.mmap, int, int, int] | None:
        """(map, its address, first byte, end byte) of `t` in the map that holds it, if one does."""
        if t.numel() == 0 or t.device.type != "cpu" or t.is_mkldnn:
            return None
        begin = t.data_ptr()
        end = begin + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))) * t.element_size()
        for mm, base in self._maps.values():
            if base <= begin and end <= base + len(mm):
                return mm, base, begin, end
        return None

    def release(self, t: torch.Tensor) -> None:
        """Drop the resident pages that lie wholly inside `t`'s bytes (a view of one of these maps); a
        later read faults them in again from the file, so this never changes a value."""
        found = self._map_of(t) if hasattr(mmap, "MADV_DONTNEED") else None
        if found is not None:
            mm, base, begin, end = found
            first = -(-(begin - base) // mmap.PAGESIZE) * mmap.PAGESIZE
            last = (end - base) // mmap.PAGESIZE * mmap.PAGESIZE
            if last > first:
                mm.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Forget the maps; each is unmapped once no tensor views it any more."""
        self._maps.clear()


def load_tokenizer(folder: str | Path):
    """The model folder's own tokenizer (never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelFolderError(
            f"{folder} has no usable tokenizer ({e}): add the model's tokenizer files, or use the Python API "
            "with token ids"
        ) from None
