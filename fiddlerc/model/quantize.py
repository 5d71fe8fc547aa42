"""Quantizing the cpu-tier experts at compile time (`--expert-dtype`), into the compiled folder.

Expert by expert, matrix by matrix: each is read from the model's memory-mapped safetensors,
quantized (fiddlerc.quant_format), written, and its pages released, so memory stays at one matrix
however big the model. The output is one safetensors file, `EXPERTS_FILE`, whose header is known
before any weight is read (the formats' sizes follow from the shapes); the loader memory-maps it and
never quantizes again. Experts on a GPU are not in it: they keep the compute dtype.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fiddlerc.errors import UnsupportedModelError
from fiddlerc.files import open_atomic
from fiddlerc.model.families import find_layout
from fiddlerc.model.folder import ModelFolder
from fiddlerc.model.weights import ExpertTensors, Source, WeightReader
from fiddlerc.plan import CPU, Plan
from fiddlerc.quant_format import GROUP, PANEL, check_shape, quantize
from fiddlerc.units import format_size, parse_dtype

log = logging.getLogger(__name__)

EXPERTS_FILE = "experts.safetensors"
_ST_CODES = {torch.int8: "I8", torch.uint8: "U8", torch.float16: "F16"}


def matrix_key(layer: int, expert: int, part: str) -> str:
    """The prefix of one quantized matrix in EXPERTS_FILE: `part` is in0, in1 (input projections, as the
    family's layout splits them) or out; `.data` and `.scales` follow."""
    return f"layers.{layer}.experts.{expert}.{part}"


def _stored(shape: tuple[int, int], fmt: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(suffix, dtype, shape) of the two tensors that hold a quantized [rows, cols] matrix."""
    rows, cols = shape
    block_bytes = GROUP if fmt == "int8" else GROUP // 2
    data_dtype = torch.int8 if fmt == "int8" else torch.uint8
    return [
        ("data", data_dtype, (rows // PANEL, cols // GROUP, PANEL, block_bytes)),
        ("scales", torch.float16, (rows // PANEL, cols // GROUP, PANEL)),
    ]


def _cpu_matrices(model: nn.Module, plan: Plan, experts: ExpertTensors):
    """(key, matrix view) of every cpu-tier expert's matrices, in plan order; nothing is read yet."""
    hidden = getattr(model.config, "hidden_size", None)
    for ml in plan.moe_layers:
        layout = find_layout(model.get_submodule(ml.block), hidden)
        for e, device in enumerate(plan.placement(ml.layer)):
            if device != CPU:
                continue
            parts = experts.expert(layout, ml.block, ml.experts_module, e)
            named = [(f"in{i}", m) for i, m in enumerate(parts.w_in)] + [("out", parts.w_out)]
            for part, m in named:
                yield matrix_key(ml.layer, e, part), m


class QuantizedExperts:
    """The cpu-tier experts of `plan` in `plan.target.expert_dtype`: laid out before anything is written (a
    shape the blocks do not divide is refused here), then `write` streams them into a compiled folder."""

    def __init__(self, model: nn.Module, folder: ModelFolder, sources: dict[str, Source], plan: Plan) -> None:
        self.fmt = fmt = plan.target.expert_dtype
        self.reader = WeightReader(folder)
        self.experts = ExpertTensors(model, self.reader, sources, parse_dtype(plan.model.dtype))
        self.matrices = list(_cpu_matrices(model, plan, self.experts))
        header: dict[str, object] = {"__metadata__": {"format": fmt, "group": str(GROUP), "panel": str(PANEL)}}
        offset = 0
        for key, m in self.matrices:
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

    def write(self, out: Path) -> None:
        """Quantize matrix by matrix into `out / EXPERTS_FILE`, releasing each source's pages."""
        progress = _Progress(len(self.matrices), self.data_bytes)
        with open_atomic(out / EXPERTS_FILE, binary=True) as fh:
            fh.write(struct.pack("<Q", len(self.header)))
            fh.write(self.header)
            for i, (key, m) in enumerate(self.matrices):
                qw = quantize(m, self.fmt)
                fh.write(qw.data.numpy().tobytes())
                fh.write(qw.scales.view(torch.int16).numpy().tobytes())
                self.reader.release(m)
                progress.update(i + 1, key)
        progress.close()
        self.matrices.clear()
        self.experts.clear()
        self.reader.close()


class _Progress:
    """One self-overwriting line on stderr when it is a terminal; a log line otherwise."""

    def __init__(self, total: int, nbytes: int) -> None:
        self.total, self.nbytes, self.t0, self.last = total, nbytes, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done: int, key: str) -> None:
        now = time.time()
        if self.tty and (now - self.last > 0.2 or done == self.total):
            self.last = now
            sys.stderr.write(f"\rquantizing experts: {done}/{self.total} matrices ({key}) ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        log.info(
            "quantized %d expert matrices into %s in %.1f s",
            self.total,
            format_size(self.nbytes),
            time.time() - self.t0,
        )
