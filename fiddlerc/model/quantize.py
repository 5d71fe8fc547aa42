"""Quantizing at compile time, into the compiled folder: the cpu-tier experts (`--expert-dtype`; an
MXFP4 checkpoint's are repacked as they are, not quantized again) and the dense projections (`--dense-dtype`: attention, shared experts, lm_head; embeddings, norms and routers
keep the compute dtype, as does a matrix the blocks do not divide or a weight tied to another).

Matrix by matrix: each is read from the model's memory-mapped safetensors, quantized
(fiddlerc.quant_format), written, and its pages released, so memory stays at one matrix however big
the model. The output is one safetensors file, `QUANTIZED_FILE`, whose header is known before any
weight is read (the formats' sizes follow from the shapes); the loader memory-maps it and never
quantizes again. Experts on a GPU are not in it: they keep the compute dtype. The dense matrices are
used where the dense weights run on the CPU (a CPU-only load); on a GPU they run in the compute dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
import time
from pathlib import Path

import torch
from torch import nn

from fiddlerc.errors import UnsupportedModelError
from fiddlerc.files import open_atomic
from fiddlerc.model.families import find_layout
from fiddlerc.model.folder import ModelFolder
from fiddlerc.model.mxfp4 import Mxfp4Matrix
from fiddlerc.model.weights import DirectSource, ExpertTensors, Source, WeightReader
from fiddlerc.plan import CPU, MXFP4, Plan
from fiddlerc.progress import progress
from fiddlerc.quant_format import GROUP, PANEL, QuantizedWeight, check_shape, from_mxfp4, quantize
from fiddlerc.units import format_size, parse_dtype

log = logging.getLogger(__name__)

QUANTIZED_FILE = "quantized.safetensors"
_ST_CODES = {torch.int8: "I8", torch.uint8: "U8", torch.float16: "F16"}


def dense_key(module: str) -> str:
    """The prefix of a quantized dense `nn.Linear` weight in QUANTIZED_FILE (`module` its path)."""
    return f"dense.{module}"


def matrix_key(layer: int, expert: int, part: str) -> str:
    """The prefix of one quantized matrix in QUANTIZED_FILE: `part` is in0, in1 (input projections, as the
    family's layout splits them) or out; `.data` and `.scales` follow."""
    return f"layers.{layer}.experts.{expert}.{part}"


def _stored(shape: tuple[int, int], fmt: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(suffix, dtype, shape) of the two tensors that hold a quantized [rows, cols] matrix."""
    rows, cols = shape
    block_bytes = GROUP if fmt == "int8" else GROUP // 2
    data_dtype = torch.int8 if fmt == "int8" else torch.uint8
    return [
        ("data", data_dtype, (rows // PANEL, cols // GROUP, PANEL, block_bytes)),
        ("scales", torch.uint8 if fmt == MXFP4 else torch.float16, (rows // PANEL, cols // GROUP, PANEL)),
    ]


def _quantized(m: torch.Tensor | Mxfp4Matrix, fmt: str) -> QuantizedWeight:
    if isinstance(m, Mxfp4Matrix):
        assert not m.transposed, "the family layout left an MXFP4 matrix transposed"
        return from_mxfp4(m.blocks, m.scales)
    return quantize(m, fmt)


def _cpu_matrices(model: nn.Module, plan: Plan, experts: ExpertTensors):
    """(key, matrix view) of every cpu-tier expert's matrices, in plan order; nothing is read yet."""
    hidden = getattr(model.config, "hidden_size", None)
    keep = plan.target.expert_dtype == MXFP4
    for ml in plan.moe_layers:
        layout = find_layout(model.get_submodule(ml.block), hidden)
        for e, device in enumerate(plan.placement(ml.layer)):
            if device != CPU:
                continue
            parts = experts.expert(layout, ml.block, ml.experts_module, e, keep_mxfp4=keep)
            named = [(f"in{i}", m) for i, m in enumerate(parts.w_in)] + [("out", parts.w_out)]
            for part, m in named:
                yield matrix_key(ml.layer, e, part), m


def _dense_matrices(model: nn.Module, plan: Plan, sources: dict[str, Source], reader: WeightReader):
    """(key, matrix view) of every dense `nn.Linear` weight to quantize (see the module docstring)."""
    fmt = plan.target.dense_dtype
    experts = tuple(ml.experts_module + "." for ml in plan.moe_layers)
    routers = {
        f"{ml.block}.{name}"
        for ml in plan.moe_layers
        for name, m in model.get_submodule(ml.block).named_children()
        if isinstance(m, nn.Linear) and m.out_features == ml.num_experts
    }
    keys: dict[str, int] = {}
    for src in sources.values():
        if isinstance(src, DirectSource):
            keys[src.key] = keys.get(src.key, 0) + 1
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name in routers or name.startswith(experts):
            continue
        src = sources.get(f"{name}.weight")
        if not isinstance(src, DirectSource) or keys[src.key] > 1:  # tied to the embeddings: kept as it is
            continue
        try:
            check_shape(tuple(module.weight.shape), fmt)
        except ValueError:
            continue  # too narrow or odd for the blocks: stays in the compute dtype
        yield dense_key(name), reader.get(src.key)


class QuantizedWeights:
    """What `plan` quantizes, laid out before anything is written (a cpu-tier expert the blocks do not
    divide is refused here), then `write` streams it into a compiled folder."""

    def __init__(self, model: nn.Module, folder: ModelFolder, sources: dict[str, Source], plan: Plan) -> None:
        t = plan.target
        self.reader = WeightReader(folder)
        self.experts = ExpertTensors(model, self.reader, sources, parse_dtype(plan.model.dtype))
        self.matrices: list[tuple[str, torch.Tensor | Mxfp4Matrix, str]] = []
        if t.expert_dtype is not None:
            self.matrices += [(k, m, t.expert_dtype) for k, m in _cpu_matrices(model, plan, self.experts)]
        if t.dense_dtype is not None:
            self.matrices += [(k, m, t.dense_dtype) for k, m in _dense_matrices(model, plan, sources, self.reader)]
        meta = {"experts": str(t.expert_dtype), "dense": str(t.dense_dtype), "group": str(GROUP), "panel": str(PANEL)}
        header: dict[str, object] = {"__metadata__": meta}
        offset = 0
        for key, m, fmt in self.matrices:
            try:
                check_shape(tuple(m.shape), fmt)
            except ValueError as e:
                raise UnsupportedModelError(f"{key}: {e}") from None
            for suffix, st_dtype, shape in _stored(tuple(m.shape), fmt):
                size = st_dtype.itemsize * math.prod(shape)
                entry = {"dtype": _ST_CODES[st_dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
                header[f"{key}.{suffix}"] = entry
                offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        self.header = text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.data_bytes = offset

    def write(self, out: Path) -> str:
        """Quantize matrix by matrix into `out / QUANTIZED_FILE`, releasing each source's pages; the sha256
        of the file, hashed as written (`fiddlerc verify` checks it)."""
        t0, total = time.time(), len(self.matrices)
        digest = hashlib.sha256()
        with open_atomic(out / QUANTIZED_FILE, binary=True) as fh:

            def put(data: bytes) -> None:
                fh.write(data)
                digest.update(data)

            put(struct.pack("<Q", len(self.header)))
            put(self.header)
            for key, m, fmt in progress(self.matrices, "quantizing weights"):
                qw = _quantized(m, fmt)
                put(qw.data.numpy().tobytes())
                put(qw.scales.view(torch.uint8).numpy().tobytes())
                for t in (m.blocks, m.scales) if isinstance(m, Mxfp4Matrix) else (m,):
                    self.reader.release(t)
        log.info("quantized %d matrices into %s in %.1f s", total, format_size(self.data_bytes), time.time() - t0)
        self.matrices.clear()
        self.experts.clear()
        self.reader.close()
        return digest.hexdigest()
