"""What the generated attention (module.py's `attention` method) runs on: its fused weights, the
in-place write into transformers' `StaticCache`, the decode-time mask rules, and the one-token path in C
(`attend_one`) a CPU load takes.

Which layers get generated code, and the code itself, are compile-time decisions
(fiddlerc.compiler.attention); this module holds only what runs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from fiddlerc.quant_format import cat_rows
from fiddlerc.runtime import kernels, quant
from fiddlerc.runtime.slots import PackedPrefill, SlotCache, SlotView


class AttentionWeights(nn.Module):
    """What a generated attention layer reads: the fused QKV projection, the output projection and, where the
    family normalises each head of its queries and keys (Qwen3), those norms' weights, one row per head
    ([query heads + KV heads, head_dim]: the queries' weight repeated, then the keys'). Takes the place of
    the Hugging Face module in the model, so its weights are held once."""

    def __init__(
        self,
        qkv: torch.Tensor,
        qkv_bias: torch.Tensor | None,
        o: torch.Tensor,
        o_bias: torch.Tensor | None,
        head_norm: torch.Tensor | None = None,
    ):
        super().__init__()
        self.qkv, self.qkv_bias, self.o, self.o_bias, self.head_norm = qkv, qkv_bias, o, o_bias, head_norm

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer's attention runs in the generated module.py (CompiledForward.attention)")

    def extra_repr(self) -> str:
        kinds = {kernels.RowSplit: " (row-split)", kernels.NativeWeight: " (native)"}
        how = kinds.get(type(self.qkv), " (packed)" if self.qkv.is_mkldnn else "")
        return f"qkv={tuple(self.qkv.shape)}, o={tuple(self.o.shape)}{how}"


def fuse_qkv(
    q: nn.Linear,
    k: nn.Linear,
    v: nn.Linear,
    o: nn.Linear,
    place,
    release,
    quantized: tuple | None = None,
    head_norm: torch.Tensor | None = None,
) -> AttentionWeights:
    """The fused weights of a Hugging Face attention module of a generated kind, from its four
    projections: [q; k; v] rows copied once (the originals' pages released), each matrix then as
    `place` gives it (the loader's choice: packed for its kernel, or in huge-page host memory).
    `quantized`: the four weights as the compile quantized them (fiddlerc.quant_format), used instead;
    the projections' own weights are then released unread. `head_norm`: the per-head norm weights
    (`head_norm_rows`), kept as they are."""
    if quantized is not None:
        qkv, o_w = cat_rows(quantized[:3]), quantized[3]
        for p in (q, k, v, o):
            release(p.weight)
    else:
        qkv = torch.cat([q.weight, k.weight, v.weight]).detach()
    biases = [p.bias for p in (q, k, v)]
    qkv_bias = None
    if any(b is not None for b in biases):
        qkv_bias = torch.cat(
            [
                b if b is not None else torch.zeros(p.out_features, dtype=q.weight.dtype, device=q.weight.device)
                for b, p in zip(biases, (q, k, v), strict=True)
            ]
        ).detach()
    if quantized is None:
        for p in (q, k, v):
            release(p.weight)
        qkv, o_w = place(qkv), place(o.weight.detach())
    return AttentionWeights(qkv, qkv_bias, o_w, None if o.bias is None else o.bias.detach(), head_norm)


def head_norm_rows(module: nn.Module) -> torch.Tensor | None:
    """The per-head norm weights of an attention module with `q_norm` and `k_norm` over each head, as
    `AttentionWeights.head_norm` holds them; None for a module without them."""
    if not hasattr(module, "q_norm"):
        return None
    q_w, k_w = module.q_norm.weight.detach(), module.k_norm.weight.detach()
    d = q_w.shape[0]
    heads, kv_heads = module.q_proj.out_features // d, module.k_proj.out_features // d
    return torch.cat([q_w.expand(heads, d), k_w.expand(kv_heads, d)])


def kv_append(cache, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write this step's keys/values [B, kv_heads, T, D] into layer `layer` of a transformers StaticCache,
    in place; the filled prefix [B, kv_heads, length, D] of both, as views (no allocation). A batched step
    of the server's SlotCache writes each sequence's token at its own position, a packed prefill each
    prompt's keys into its own slot (fiddlerc.runtime.slots)."""
    if isinstance(cache, (SlotCache, PackedPrefill)):
        return cache.append(layer, k, v)
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


_CACHE_KINDS = {torch.float32: 0, torch.bfloat16: 1}  # _attention.c's C_ codes


def attend_one(
    cache,
    layer: int,
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    head_norm: torch.Tensor | None,
    eps: float,
) -> torch.Tensor | None:
    """One new token of one sequence through the generated attention after its QKV projection, in one C call
    (`_attention.c`: per-head norms where given, the rotary, the cache write, attention over the filled
    prefix): the attention output [1, 1, heads * head_dim] in qkv's dtype, for the output projection. A
    batched step of the server's SlotCache is one C call for all its rows, each over its own slot
    (`attend_rows`). None where it does not apply (another batch or dtype, a cache not yet filled by a
    prefill, no C kernels): the generated code then runs its torch ops. The module.py that calls it was
    generated for a rotary of the standard form (fiddlerc.compiler.attention.rotary_is_standard)."""
    lib = quant.library()
    kind = _CACHE_KINDS.get(qkv.dtype)
    if isinstance(cache, SlotCache):
        return attend_rows(cache, layer, qkv, cos, sin, (heads, kv_heads, head_dim, scale), head_norm, eps)
    lay = cache.layers[layer]
    if lib is None or kind is None or qkv.shape[0] != 1 or not lay.is_initialized or qkv.device.type != "cpu":
        return None
    keys, values = lay.keys, lay.values
    if keys.dtype != qkv.dtype or not (keys.is_contiguous() and values.is_contiguous()) or keys.shape[0] != 1:
        return None
    if head_norm is not None and head_norm.dtype != qkv.dtype:
        return None
    pos = lay.fiddlerc_length
    if pos + 1 > lay.max_cache_len:
        raise RuntimeError(f"the KV cache holds {lay.max_cache_len} tokens: the context this model was compiled for")
    x = quant.as_f32(qkv)
    c, s_ = quant.as_f32(cos), quant.as_f32(sin)
    norm = 0 if head_norm is None else head_norm.contiguous().data_ptr()
    out = torch.empty(1, 1, heads * head_dim, dtype=torch.float32)
    code = lib.lib.fc_attention_decode(kind, x.data_ptr(), norm, eps, c.data_ptr(), s_.data_ptr(), heads, kv_heads,
                                       head_dim, keys.data_ptr(), values.data_ptr(), lay.max_cache_len, pos, scale,
                                       out.data_ptr(), torch.get_num_threads(), int(lib.simd))  # fmt: skip
    if code != 0:
        raise MemoryError("fiddlerc's attention kernel could not allocate its buffer")
    lay.cumulative_length.add_(1)  # what Hugging Face's own code reads (get_seq_length), as kv_append keeps it
    lay.fiddlerc_length = pos + 1
    return out.to(qkv.dtype)


def attend_rows(
    cache: SlotCache,
    layer: int,
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    shape: tuple[int, int, int, float],
    head_norm: torch.Tensor | None,
    eps: float,
) -> torch.Tensor | None:
    """`attend_one` for a batched step of the slot cache (after `begin_step`), `shape` its (heads, kv_heads,
    head_dim, scale): row r of qkv [rows, 1, ...] is slot r's new token at its own position, written into its
    slot and attending over that slot's filled prefix, in one C call (`fc_attention_decode_rows`) for the
    step; the output [rows, 1, heads * head_dim]. None where it does not apply (the torch ops then run, with
    the step's mask)."""
    heads, kv_heads, head_dim, scale = shape
    lib = quant.library()
    kind = _CACHE_KINDS.get(qkv.dtype)
    keys, values = cache.keys[layer], cache.values[layer]
    rows = qkv.shape[0]
    if lib is None or kind is None or rows != cache.rows or qkv.device.type != "cpu" or keys.dtype != qkv.dtype:
        return None
    if not (keys.is_contiguous() and values.is_contiguous()) or (
        head_norm is not None and head_norm.dtype != qkv.dtype
    ):
        return None
    x = quant.as_f32(qkv.reshape(rows, -1))
    c, s_ = quant.as_f32(cos.reshape(rows, head_dim)), quant.as_f32(sin.reshape(rows, head_dim))
    positions = cache.positions.contiguous()
    norm = 0 if head_norm is None else head_norm.contiguous().data_ptr()
    out = torch.empty(rows, 1, heads * head_dim, dtype=torch.float32)
    code = lib.lib.fc_attention_decode_rows(kind, rows, x.data_ptr(), x.shape[1], norm, eps, c.data_ptr(),
                                            s_.data_ptr(), heads, kv_heads, head_dim, keys.data_ptr(),
                                            values.data_ptr(), keys[0].numel(), cache.context, positions.data_ptr(),
                                            scale, out.data_ptr(), torch.get_num_threads(), int(lib.simd))  # fmt: skip
    if code != 0:
        raise MemoryError("fiddlerc's attention kernel could not allocate its buffer")
    cache.advance(layer)
    return out.to(qkv.dtype)


def one_token_each(cache, attention_mask) -> bool:
    """Whether a one-token call (t == 1) may take `attend_one`: one sequence without padding (no mask), or a
    batched step of the server's slot cache, whose mask only says each slot's length, which the C call reads."""
    return attention_mask is None or isinstance(cache, SlotCache)


def causal_mask(*args, **kwargs):
    """transformers' `create_causal_mask`, except for one new token per row and no padding (no
    attention mask given): there the generated attention needs no mask at all (its one query sees every
    key of the filled cache prefix), and building one for the whole static cache is a visible share of a
    decode step. Codegen calls this instead of transformers' only when every attention layer is generated.
    The server's caches (fiddlerc.runtime.slots) make their own: a batched step's from each sequence's
    length, a packed prefill's from its prompts' bounds, a slot's next chunk of a long prompt from its length;
    none for one sequence's slot otherwise."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, (SlotCache, PackedPrefill)):
        return cache.mask()
    if isinstance(cache, SlotView) and cache.length and kwargs["inputs_embeds"].shape[1] > 1:
        return cache.chunk_mask(kwargs["inputs_embeds"].shape[1])  # the next chunk of a long prompt
    if kwargs.get("attention_mask") is None and (kwargs["inputs_embeds"].shape[1] == 1 or isinstance(cache, SlotView)):
        return None
    return create_causal_mask(*args, **kwargs)


def causal_without_mask(t: int, length: int) -> bool:
    """Whether SDPA's own causal mask is right for `t` new queries over `length` keys when the model gave
    no mask: only for a prefill from an empty cache (SDPA aligns its mask to the first key)."""
    if t > 1 and length != t:
        raise RuntimeError("a multi-token call on a filled cache needs an attention mask; the model gave none")
    return t > 1
