"""Fused RMSNorm: Hugging Face's RMSNorm arithmetic in one normalisation call instead of eight ops.

The captured graph inlines each RMSNorm of the Llama kind (Mixtral, Qwen-MoE, DeepSeek, ...) as
`h = x.to(float32); h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps); weight * h.to(x.dtype)`.
At decode every op costs about as much as its dispatch (several microseconds here), and a model
has two such norms per layer, so lowering (`fiddlerc.compiler.lowering.fuse_rms_norms`) rewrites each match into one call of
`rms_norm` below. `torch.rms_norm` computes the same fp32 expression in one ATen call, and the
weight is applied after the cast back as Hugging Face does, so results are bit-identical (checked
by tests/runtime/test_norms.py over sizes and dtypes). Norms of other forms (Gemma's `1 + weight`,
norms without a weight) do not match and stay as they were traced.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x in fp32, normalised by its root mean square).to(x.dtype)`, as Hugging Face computes it."""
    return weight * torch.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps).to(x.dtype)
