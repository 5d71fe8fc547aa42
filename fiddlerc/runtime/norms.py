"""Fused RMSNorm: Hugging Face's RMSNorm arithmetic in one normalisation call instead of eight ops.

The captured graph inlines each RMSNorm of the Llama kind (Mixtral, Qwen-MoE, DeepSeek, ...) as
`h = x.to(float32); h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps); weight * h.to(x.dtype)`.
At decode every op costs about as much as its dispatch (several microseconds here), and a model
has two such norms per layer, so lowering (`fiddlerc.compiler.lowering.fuse_rms_norms`) rewrites each match into one call of
`rms_norm` below. `torch.rms_norm` computes the same fp32 expression in one ATen call, and the
weight is applied after the cast back as Hugging Face does, so results are bit-identical (checked
by tests/runtime/test_norms.py over sizes and dtypes). Norms of other forms (Gemma's `1 + weight`,
norms without a weight) do not match and stay as they were traced.

`torch.rms_norm` is itself a composite of some ten ATen calls on the CPU (about 14 microseconds for one
token of 64 here), so where the loader picks fiddlerc's C kernels (CPU-only, `kernels="auto"`) module.py
calls `native_rms_norm`: the same expression in one C call (`_matvec.c`'s fc_rms_norm), equal to the
reference within rounding (its sum of squares runs in another order).
"""

from __future__ import annotations

import torch

from fiddlerc.runtime import quant

_KINDS = {torch.float32: 0, torch.bfloat16: 1}  # _matvec.c's W_ codes


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x in fp32, normalised by its root mean square).to(x.dtype)`, as Hugging Face computes it."""
    return weight * torch.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps).to(x.dtype)


def native_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` in one C call where it can run there (fp32 or bf16 CPU tensors of one dtype, the C kernels
    built; a weight of one row, or one row per entry of x's next-to-last dimension: a weight per head); else
    `rms_norm`."""
    lib = quant.library()
    kind = _KINDS.get(x.dtype)
    n = x.shape[-1]
    wrows = weight.numel() // n
    per_row = weight.dim() == 1 or (weight.dim() == 2 and x.dim() >= 2 and x.shape[-2] == wrows)
    if lib is None or kind is None or weight.dtype != x.dtype or weight.shape[-1] != n or not per_row:
        return rms_norm(x, weight, eps)
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return rms_norm(x, weight, eps)
    x = x.contiguous()
    y = torch.empty_like(x)
    w = weight.contiguous().data_ptr()
    lib.lib.fc_rms_norm(kind, x.data_ptr(), w, x.numel() // n, n, wrows, eps, y.data_ptr())
    return y
