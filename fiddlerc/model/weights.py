"""Where each model parameter is on disk (transformers' conversion rules, resolved once at compile
time and stored as sources.json), and `WeightReader`, which memory-maps the safetensors files so
that a weight is never loaded twice and never copied into a compiled folder.
"""

from __future__ import annotations

import json
import math
import mmap
import re
from dataclasses import dataclass

import torch
from torch import nn

from fiddlerc.errors import ArtifactError, ModelFolderError, UnsupportedModelError
from fiddlerc.model.folder import ST_DTYPES, ModelFolder
from fiddlerc.model.mxfp4 import Mxfp4Matrix, Mxfp4Source, dequantize_mxfp4, mxfp4_shape


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
    Spares the load building transformers' conversion rules, a noticeable part of a fresh process's start."""
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
        if not all(ST_DTYPES[d].is_floating_point for d in dtypes):
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
        dtype = ST_DTYPES[info.dtype]
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


class ExpertTensors:
    """Each routed expert's weights as stored, for `Layout.weights`: views of the memory maps of a
    `WeightReader` (one view per fused [E, ...] tensor, sliced per expert), one tensor per stored
    part, or MXFP4 blocks, dequantized exactly to `dtype` or, with `keep_mxfp4`, kept as they are
    (`Mxfp4Matrix`). The loader binds what this reads; the compiler quantizes it (fiddlerc.model.quantize)."""

    def __init__(self, model: nn.Module, reader: WeightReader, sources: dict[str, Source], dtype: torch.dtype) -> None:
        self.model, self.reader, self.sources, self.dtype = model, reader, sources, dtype
        self._fused: dict[str, torch.Tensor] = {}

    def fused(self, key: str) -> torch.Tensor:
        if key not in self._fused:
            self._fused[key] = self.reader.get(key)
        return self._fused[key]

    def parts(
        self, block: str, experts_module: str, name: str, e: int, keep_mxfp4: bool = False
    ) -> tuple[torch.Tensor | Mxfp4Matrix, ...]:
        """Parameter `name` of the block at `block`: expert e's part of it."""
        src = self.sources[f"{block}.{name}"]
        if isinstance(src, DirectSource):
            return (self.fused(src.key)[e],)
        if isinstance(src, Mxfp4Source):
            blocks, scales = self.fused(src.blocks)[e], self.fused(src.scales)[e]
            w = Mxfp4Matrix(blocks, scales) if keep_mxfp4 else dequantize_mxfp4(blocks, scales, self.dtype)  # [out, in]
            transposed = getattr(self.model.get_submodule(experts_module), "is_transposed", False)
            return (w.t() if transposed else w,)
        return tuple(self.reader.get(k) for k in src.keys[e])

    def whole(self, block: str, name: str) -> torch.Tensor:
        src = self.sources[f"{block}.{name}"]
        assert isinstance(src, DirectSource)
        return self.fused(src.key)

    def expert(self, layout, block: str, experts_module: str, e: int, *, keep_mxfp4: bool = False):
        """Expert e of the MoE block at `block` as `layout` reads it (fiddlerc.model.families.ExpertParts)."""
        module = self.model.get_submodule(block)

        def parts(name: str, i: int):
            return self.parts(block, experts_module, name, i, keep_mxfp4)

        return layout.weights(module, e, parts, lambda name: self.whole(block, name))

    def clear(self) -> None:
        self._fused.clear()
