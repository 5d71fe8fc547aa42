"""Quantized checkpoints fiddlerc dequantizes exactly, per expert, when it binds weights.

MXFP4 (GPT-OSS ships its experts so): each weight row is cut into blocks of 32 values that share
one power-of-two scale; a value is a 4-bit E2M1 float. Facts from the OCP Microscaling Formats
(MX) specification v1.0: E2M1 encodes {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign bit, the shared
scale is E8M0 (an exponent with bias 127). Every product is a small float times a power of two,
so it is exact in bf16 and fp32. Checkpoints store two codes per byte, the low nibble first, as
`<param>_blocks [E, rows, groups, 16]` (uint8) and `<param>_scales [E, rows, groups]` (uint8).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

DEQUANTIZED = ("mxfp4",)  # quant_method values fiddlerc reads (others are refused, naming the scheme)

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_E8M0_BIAS = 127


@dataclass(frozen=True)
class Mxfp4Source:
    """A fused experts parameter stored as MXFP4 blocks and scales."""

    blocks: str
    scales: str


@dataclass(frozen=True)
class Mxfp4Matrix:
    """One expert's MXFP4 matrix as stored, [rows, cols] in `F.linear` layout, not dequantized: blocks
    [rows, groups, 16] and scales [rows, groups] (views of the memory-mapped checkpoint). Where its
    experts run in MXFP4 (fiddlerc.quant_format.from_mxfp4), this stands in for the dequantized tensor
    in the family layouts' code, which transposes and splits what it reads."""

    blocks: torch.Tensor
    scales: torch.Tensor
    transposed: bool = False
    ndim = 2

    @property
    def shape(self) -> tuple[int, int]:
        rows, groups, nbytes = self.blocks.shape
        return (groups * nbytes * 2, rows) if self.transposed else (rows, groups * nbytes * 2)

    def t(self) -> Mxfp4Matrix:
        return replace(self, transposed=not self.transposed)

    def chunk(self, n: int, dim: int = 0) -> tuple[Mxfp4Matrix, ...]:
        if self.transposed or dim != 0:
            raise ValueError("an MXFP4 matrix splits by rows only (its blocks run along a row)")
        return tuple(Mxfp4Matrix(b, s) for b, s in zip(self.blocks.chunk(n), self.scales.chunk(n), strict=True))


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[E, rows, groups, 16] bytes -> [E, rows, groups * 32] values."""
    *lead, groups, nbytes = blocks_shape
    return (*lead[:-1], lead[-1], groups * nbytes * 2) if lead else (groups * nbytes * 2,)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert: blocks [rows, groups, 16] uint8 and scales [rows, groups] uint8 -> [rows, groups * 32]."""
    rows, groups, nbytes = blocks.shape
    lut = torch.tensor(_E2M1, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(rows, groups, nbytes * 2).long()
    exponent = scales.to(torch.int32) - _E8M0_BIAS
    values = torch.ldexp(lut[codes], exponent[..., None].to(torch.float32))
    return values.reshape(rows, groups * nbytes * 2).to(dtype)
