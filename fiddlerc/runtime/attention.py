"""Generated attention: which attention modules fiddlerc writes its own code for, and what that code calls.

Hugging Face's attention modules are general (any cache, any attention backend, output of weights)
and allocate as they go (a dynamic cache concatenates every step). For the common kind, grouped-query
attention with rotary embeddings and plain q/k/v/o projections, the generated module.py carries
its own `attention` method instead (fiddlerc.compiler.codegen writes it): one fused QKV projection, the
family's own rotary function, keys and values written in place into a static cache
(transformers' `StaticCache`, sized for the compiled context), SDPA over the filled prefix only.
Any other kind stays a call of Hugging Face's module (the fallback); the plan records which path each
layer takes and why, and the report shows it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from fiddlerc.runtime import kernels

GENERATED, HF = "generated", "hf"
# Attention classes whose forward is exactly: q/k/v projections, the modeling file's
# `apply_rotary_pos_emb`, cache update, scaled dot-product attention with `module.scaling`, o projection.
PLAIN_GQA = (
    "MixtralAttention",
    "Qwen2MoeAttention",
    "PhimoeAttention",
    "GraniteMoeAttention",
    "GraniteMoeSharedAttention",
    "Ernie4_5_MoeAttention",
)
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_path(module: nn.Module, config) -> tuple[str, str]:
    """(path, reason) for one attention module: GENERATED when fiddlerc writes its code, else HF."""
    name = type(module).__name__
    if name not in PLAIN_GQA:
        return HF, f"{name} is not a kind fiddlerc generates (grouped-query attention with rotary embeddings)"
    if not all(isinstance(getattr(module, p, None), nn.Linear) for p in _PROJ):
        return HF, f"{name} has no plain q/k/v/o projections"
    if any(hasattr(module, a) for a in ("q_norm", "k_norm", "sinks")):
        return HF, f"{name} normalises its queries/keys or has attention sinks"
    if getattr(config, "sliding_window", None) or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or ()
    ):
        return HF, "sliding-window attention keeps Hugging Face's cache"
    if rotary_function(module) is None:
        return HF, f"{name}'s modeling file has no apply_rotary_pos_emb"
    return GENERATED, "grouped-query attention with rotary embeddings: fused QKV, static KV cache"


def rotary_function(module: nn.Module):
    """The modeling file's own `apply_rotary_pos_emb` (exactly the family's rotary arithmetic)."""
    fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    return fn if callable(fn) else None


def rotary_is_standard(fn, model: nn.Module, head_dim: int) -> bool:
    """Whether the family's `apply_rotary_pos_emb` is exactly `x * cos + rotate_half(x) * sin` over the
    whole head (the model's rotary tables, `inv_freq`, span the head; the function is checked on seeded
    random inputs, fp32 and bf16, to the bit): then the generated code rotates queries and keys in one
    go, with the same elementwise operations (fewer calls); else it calls the family's function (Ernie
    4.5 interleaves, a partial rotary rotates part of the head)."""
    tables = [b for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] == "inv_freq"]
    if not tables or any(2 * t.shape[-1] != head_dim for t in tables):
        return False
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = (torch.randn(2, n, 3, 8, generator=gen).to(dtype) for n in (4, 2))
        cos, sin = (torch.randn(2, 3, 8, generator=gen).to(dtype) for _ in range(2))
        try:
            got = fn(q, k, cos, sin)
        except Exception:  # noqa: BLE001 - any other signature is not the standard function
            return False
        c, s_ = cos[:, None], sin[:, None]
        want = [x * c + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * s_ for x in (q, k)]
        if not all(
            isinstance(g, torch.Tensor) and g.dtype == w.dtype and torch.equal(g, w)
            for g, w in zip(got, want, strict=True)
        ):
            return False
    return True


def shape_of(module: nn.Module) -> dict[str, int | float]:
    """The numbers the generated code is written with."""
    head_dim = int(module.head_dim)
    q_out, k_out, v_out = (getattr(module, p).out_features for p in _PROJ[:3])
    return {
        "heads": q_out // head_dim,
        "kv_heads": k_out // head_dim,
        "head_dim": head_dim,
        "q": q_out,
        "k": k_out,
        "v": v_out,
        "scaling": float(module.scaling),
    }


class AttentionWeights(nn.Module):
    """What a generated attention layer reads: the fused QKV projection and the output projection.
    Takes the place of the Hugging Face module in the model, so its weights are held once."""

    def __init__(self, qkv: torch.Tensor, qkv_bias: torch.Tensor | None, o: torch.Tensor, o_bias: torch.Tensor | None):
        super().__init__()
        self.qkv, self.qkv_bias, self.o, self.o_bias = qkv, qkv_bias, o, o_bias

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer's attention runs in the generated module.py (CompiledForward.attention)")

    def extra_repr(self) -> str:
        how = " (row-split)" if type(self.qkv) is kernels.RowSplit else " (packed)" if self.qkv.is_mkldnn else ""
        return f"qkv={tuple(self.qkv.shape)}, o={tuple(self.o.shape)}{how}"


def fuse(module: nn.Module, place, release) -> AttentionWeights:
    """The fused weights of a Hugging Face attention module of a generated kind: [q; k; v] rows copied
    once (the originals' pages released), each matrix then as `place` gives it (the loader's choice:
    packed for its kernel, or in huge-page host memory)."""
    q, k, v, o = (getattr(module, p) for p in _PROJ)
    qkv = torch.cat([q.weight, k.weight, v.weight]).detach()
    biases = [p.bias for p in (q, k, v)]
    qkv_bias = None
    if any(b is not None for b in biases):
        qkv_bias = torch.cat(
            [
                b if b is not None else torch.zeros(p.out_features, dtype=qkv.dtype, device=qkv.device)
                for b, p in zip(biases, (q, k, v), strict=True)
            ]
        ).detach()
    for p in (q, k, v):
        release(p.weight)
    o_w = place(o.weight.detach())
    return AttentionWeights(place(qkv), qkv_bias, o_w, None if o.bias is None else o.bias.detach())


def kv_append(cache, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write this step's keys/values [B, kv_heads, T, D] into layer `layer` of a transformers StaticCache,
    in place; the filled prefix [B, kv_heads, length, D] of both, as views (no allocation)."""
    lay = cache.layers[layer]
    if not lay.is_initialized:
        lay.lazy_initialization(k, v)
        lay.fiddlerc_length = 0
    start, t = lay.fiddlerc_length, k.shape[2]
    if start + t > lay.max_cache_len:
        raise RuntimeError(f"the KV cache holds {lay.max_cache_len} tokens: the context this model was compiled for")
    lay.keys[:, :, start : start + t].copy_(k)
    lay.values[:, :, start : start + t].copy_(v)
    lay.cumulative_length.add_(t)  # what Hugging Face's own code reads (get_seq_length)
    lay.fiddlerc_length = start + t
    return lay.keys[:, :, : start + t], lay.values[:, :, : start + t]


def causal_mask(*args, **kwargs):
    """transformers' `create_causal_mask`, except for one new token per row and no padding (no
    attention mask given): there the generated attention needs no mask at all (its one query sees every
    key of the filled cache prefix), and building one for the whole static cache took ~0.3 ms per token
    here. Codegen calls this instead of transformers' only when every attention layer is generated."""
    if kwargs.get("attention_mask") is None and kwargs["inputs_embeds"].shape[1] == 1:
        return None
    return create_causal_mask(*args, **kwargs)


def causal_without_mask(t: int, length: int) -> bool:
    """Whether SDPA's own causal mask is right for `t` new queries over `length` keys when the model gave
    no mask: only for a prefill from an empty cache (SDPA aligns its mask to the first key)."""
    if t > 1 and length != t:
        raise RuntimeError("a multi-token call on a filled cache needs an attention mask; the model gave none")
    return t > 1
