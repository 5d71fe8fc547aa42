"""The block formats of quantized CPU-tier experts (`--expert-dtype`): plain data.

Each format cuts a row into blocks of `GROUP` = 32 weights that share one scale:
- `int8`: `weight = scale * q`, q in [-127, 127], an fp16 scale; 8.5 bits per weight.
- `int4`: `weight = scale * q`, q in [-8, 7], two per byte, an fp16 scale; 4.5 bits per weight. The
  scale is the block's largest-magnitude weight over -8, so that weight is exact and all 16 levels
  are used. (int8 and int4 are the block layouts of llama.cpp's Q8_0 and Q4_0, so bits per weight
  compare one to one.)
- `mxfp4`: a 4-bit E2M1 float per weight, two per byte, and a power-of-two E8M0 scale; 4.25 bits per
  weight. Never made here: an MXFP4 checkpoint's experts (GPT-OSS) are repacked into this layout bit
  for bit (`from_mxfp4`), so the kernel computes with exactly the checkpoint's weights.

Rows are stored in panels of `PANEL` = 4, block by block (`data[panel, block, row]`), so that a
product reads a weight as one sequential stream (`_quant.c` says why).

A product quantizes its activations per block to int8 with an fp32 scale, and sums exact integer
block dot products times the two scales (the C kernels of fiddlerc.runtime.quant; an E2M1 value
times two is an integer in [-12, 12]). `reference_matmul` does the same arithmetic in fp32 torch
ops: the kernels equal it up to the order of the float sums. Quantizing happens at compile time
(fiddlerc.model.quantize); this module is what the compiler, the loader and the runtime share about
the formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fiddlerc.plan import MXFP4
from fiddlerc.plan import QUANTIZED as FORMATS

GROUP = 32  # weights per block, and per activation scale
PANEL = 4  # rows stored side by side, block by block
# E2M1 codes (bit 3 the sign) times two, so that each is an integer: the OCP Microscaling Formats (MX)
# specification v1.0 gives the values {0, 0.5, 1, 1.5, 2, 3, 4, 6}; their scale E8M0 has bias 127.
E2M1_TIMES_2 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
E8M0_BIAS = 127


@dataclass(frozen=True)
class QuantizedWeight:
    """A [rows, cols] matrix in one of `FORMATS`: `data` [rows // PANEL, cols // GROUP, PANEL, bytes per
    block], int8 q (int8), uint8 nibbles q + 8 (int4, two a byte: see `_quant.c`) or uint8 nibbles of
    E2M1 codes (mxfp4, ordered as int4's); `scales` [rows // PANEL, cols // GROUP, PANEL], fp16 (int8,
    int4) or uint8 E8M0 exponents (mxfp4)."""

    fmt: str
    data: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype = field(default=torch.float32, compare=False)  # the compute dtype of products and fetches
    is_mkldnn = False  # read like a weight tensor by the code that picks kernels: never oneDNN-packed

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0] * PANEL, self.scales.shape[1] * GROUP

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        rows, cols = self.shape
        return rows * cols

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


def cat_rows(weights) -> QuantizedWeight:
    """The rows of several matrices of one format and width, one after the other ([q; k; v]): panels of
    whole rows concatenate as they are, so this quantizes nothing."""
    first = weights[0]
    return QuantizedWeight(
        first.fmt, torch.cat([w.data for w in weights]), torch.cat([w.scales for w in weights]), first.dtype
    )


def bits_per_weight(fmt: str) -> float:
    """Stored bits per weight, scales included."""
    return {"int8": 8 + 16 / GROUP, "int4": 4 + 16 / GROUP, MXFP4: 4 + 8 / GROUP}[fmt]


def stored_bytes(nbytes: int, itemsize: int, fmt: str | None) -> int:
    """Bytes a matrix of `nbytes` in a dtype of `itemsize` takes in `fmt` (None: as it is)."""
    return nbytes if fmt is None else int(nbytes // itemsize * bits_per_weight(fmt)) // 8


def check_shape(shape: tuple[int, int], fmt: str) -> None:
    """Refuse a matrix the block size does not divide, naming the fix."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if shape[1] % (2 * GROUP) or shape[0] % PANEL:
        raise ValueError(
            f"a [{shape[0]}, {shape[1]}] matrix cannot be quantized to {fmt}: {fmt} needs rows of a multiple of "
            f"{2 * GROUP} weights (two blocks of {GROUP}) and a multiple of {PANEL} rows; keep this model's experts "
            "in the compute dtype"
        )


def quantize(w: torch.Tensor, fmt: str) -> QuantizedWeight:
    """Quantize a [rows, cols] weight (any float dtype) to int8 or int4, deterministically."""
    check_shape(tuple(w.shape), fmt)
    if fmt == MXFP4:
        raise ValueError("mxfp4 weights are kept from an MXFP4 checkpoint (from_mxfp4), not made from others")
    rows, cols = w.shape
    blocks = w.detach().to(torch.float32).reshape(rows, cols // GROUP, GROUP)
    if fmt == "int8":
        scale = (blocks.abs().amax(-1) / 127).to(torch.float16)
    else:  # the block's largest-magnitude weight, with its sign, maps to -8
        idx = blocks.abs().argmax(-1, keepdim=True)
        scale = (blocks.gather(-1, idx).squeeze(-1) / -8).to(torch.float16)
    s = scale.to(torch.float32)[..., None]
    inv = torch.where(s == 0, torch.zeros_like(s), 1 / s)
    lo, hi = (-127, 127) if fmt == "int8" else (-8, 7)
    q = torch.round(blocks * inv).clamp_(lo, hi).to(torch.int8)
    if fmt == "int4":
        u = (q + 8).to(torch.uint8)
        q = u[..., : GROUP // 2] | (u[..., GROUP // 2 :] << 4)
    return QuantizedWeight(fmt, _panels(q), _panels(scale))


def _panels(rows_blocks: torch.Tensor) -> torch.Tensor:
    """[rows, blocks, ...] -> the panel layout [rows // PANEL, blocks, PANEL, ...]."""
    rows, nb, *rest = rows_blocks.shape
    return rows_blocks.reshape(rows // PANEL, PANEL, nb, *rest).transpose(1, 2).contiguous()


def from_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    """One matrix of an MXFP4 checkpoint, blocks [rows, cols // 32, 16] (element 2j in the low nibble of
    byte j, 2j + 1 in its high one) and E8M0 scales [rows, cols // 32], repacked bit for bit."""
    rows, nb, _ = blocks.shape
    check_shape((rows, nb * GROUP), MXFP4)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(rows, nb, GROUP)
    packed = codes[..., : GROUP // 2] | (codes[..., GROUP // 2 :] << 4)
    return QuantizedWeight(MXFP4, _panels(packed), _panels(scales.to(torch.uint8)))


def _values(qw: QuantizedWeight) -> torch.Tensor:
    """The integer values of each weight (q, or an E2M1 value times two), int8 [rows, cols // GROUP, GROUP]."""
    rows, cols = qw.shape
    b = qw.data.transpose(1, 2).reshape(rows, cols // GROUP, -1)
    if qw.fmt == "int8":
        return b
    codes = torch.cat([(b & 0x0F), (b >> 4)], dim=-1)
    if qw.fmt == MXFP4:
        return torch.tensor(E2M1_TIMES_2, dtype=torch.int8)[codes.long()]
    return codes.to(torch.int8) - 8


def _row_scales(qw: QuantizedWeight) -> torch.Tensor:
    """fp32 [rows, cols // GROUP]: what multiplies `_values` (for mxfp4, 2^(e - 127) / 2, exact)."""
    s = qw.scales.transpose(1, 2).reshape(qw.shape[0], -1)
    if qw.fmt == MXFP4:
        return torch.ldexp(torch.tensor(0.5), s.to(torch.float32) - E8M0_BIAS)
    return s.to(torch.float32)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = qw.shape
    w = _values(qw).to(torch.float32) * _row_scales(qw)[..., None]
    return w.reshape(rows, cols).to(dtype)


def quantize_activations_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [n, cols] as the kernels quantize them: int8 [n, cols] and fp32 scales [n, cols // GROUP]."""
    n, cols = x.shape
    blocks = x.to(torch.float32).reshape(n, cols // GROUP, GROUP)
    scale = blocks.abs().amax(-1) / 127
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    q = torch.round(blocks * inv[..., None]).to(torch.int8)
    return q.reshape(n, cols), scale


@dataclass(frozen=True)
class QuantizedActivations:
    """Activations [n, cols] quantized once (as `quantize_activations_reference` does) and shared by every
    product that reads them, such as an expert's gate and up projections."""

    q: torch.Tensor  # int8 [n, cols]
    scales: torch.Tensor  # fp32 [n, cols // GROUP]


def reference_matmul(x: torch.Tensor | QuantizedActivations, qw: QuantizedWeight) -> torch.Tensor:
    """`x @ W.T` [n, rows] fp32 with the kernels' arithmetic: block integer dot products times both scales."""
    xq, xd = (x.q, x.scales) if isinstance(x, QuantizedActivations) else quantize_activations_reference(x)
    rows, cols = qw.shape
    nb = cols // GROUP
    dots = torch.einsum("rbg,nbg->nrb", _values(qw).to(torch.float64), xq.reshape(-1, nb, GROUP).to(torch.float64))
    scaled = dots.to(torch.float32) * _row_scales(qw)[None] * xd[:, None, :]
    return scaled.sum(-1)
