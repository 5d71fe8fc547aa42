"""Products of a few tokens with a float CPU weight as it is bound (bf16, fp16 or fp32; memory-mapped,
never repacked), in fiddlerc's C kernel (`_matvec.c`, built with the package): at one token it reads
the weight at memory bandwidth where `F.linear`'s matrix-vector product does not (kernels.py says when
it is chosen: by measurement, per shape). Calls of more tokens than a weight's `max_tokens` (at least
`MAX_TOKENS`; measured per shape) run `F.linear`, whose matrix-matrix products reuse each weight across
the tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fiddlerc.runtime import quant

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # _matvec.c's W_ codes
MAX_TOKENS = 2


def supports(w: torch.Tensor) -> bool:
    """Whether the kernel can read `w` where it is: a contiguous CPU matrix of a float dtype it knows."""
    return quant.available() and w.dtype in KINDS and w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous()


def matvec(x: torch.Tensor, w: torch.Tensor, *, threads: int | None = None, simd: bool | None = None) -> torch.Tensor:
    """`x @ w.T` as fp32 [n, rows] for x [n, cols] (any float dtype); rows split over `threads` (default:
    torch's intra-op thread count)."""
    lib = quant.library()
    if lib is None or not supports(w):
        raise RuntimeError(
            "fiddlerc's float kernel reads contiguous CPU fp32/bf16/fp16 weights, with the C kernels built"
        )
    rows, cols = w.shape
    x = quant.as_f32(x)
    if x.dim() != 2 or x.shape[1] != cols:
        raise ValueError(f"activations of shape {tuple(x.shape)} for a weight of {cols} columns")
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    lib.lib.fc_matvec(
        KINDS[w.dtype],
        w.data_ptr(),
        rows,
        cols,
        x.data_ptr(),
        x.shape[0],
        y.data_ptr(),
        threads or torch.get_num_threads(),
        int(lib.simd if simd is None else simd),
    )
    return y


class NativeWeight:
    """A CPU weight [out, in] whose products of up to `max_tokens` tokens run `matvec`; longer calls run
    `F.linear` on the same tensor (held once). The loader sets `max_tokens` from a measurement of the
    weight's shape (fiddlerc.runtime.kernels.native_tokens)."""

    is_mkldnn = False

    def __init__(self, weight: torch.Tensor, max_tokens: int = MAX_TOKENS) -> None:
        self.weight = weight
        self.max_tokens = max_tokens

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def numel(self) -> int:
        return self.weight.numel()

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def __call__(self, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        n = x.numel() // x.shape[-1]
        if n > self.max_tokens:
            return F.linear(x, self.weight, b)
        y = matvec(x.reshape(n, -1), self.weight).to(x.dtype)
        if b is not None:
            y = y + b
        return y.reshape(*lead, y.shape[-1])
