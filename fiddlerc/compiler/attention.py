"""Generated attention at compile time: which attention modules fiddlerc writes its own code for, and
that code.

Hugging Face's attention modules are general (any cache, any attention backend, output of weights)
and allocate as they go (a dynamic cache concatenates every step). For the common kind, grouped-query
attention with rotary embeddings and plain q/k/v/o projections, the generated module.py carries its
own `attention` method instead (`attention_method`): one fused QKV projection, the family's own
rotary function, keys and values written in place into a static cache (transformers'
`StaticCache`, sized for the compiled context), SDPA over the filled prefix only. Any other kind
stays a call of Hugging Face's module (the fallback); the plan records which path each layer takes
and why (passes/select_attention.py), and the report shows it. What the method calls at run time
is in fiddlerc.runtime.attention.
"""

from __future__ import annotations

import sys

import torch
import torch.fx
from torch import nn

from fiddlerc.compiler.capture import source_model
from fiddlerc.errors import PlanError
from fiddlerc.plan import GENERATED, HF, Plan

# Attention classes whose forward is exactly: q/k/v projections, the modeling file's
# `apply_rotary_pos_emb`, cache update, scaled dot-product attention with `module.scaling`, o projection.
PLAIN_GQA = (
    "MixtralAttention",
    "Qwen2MoeAttention",
    "PhimoeAttention",
    "GraniteMoeAttention",
    "GraniteMoeSharedAttention",
    "Ernie4_5_MoeAttention",
    "Qwen3MoeAttention",  # with an RMSNorm over each head of the queries and keys (`head_norm_eps`)
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the plain projections, in [q; k; v] and o order


def attention_path(module: nn.Module, config) -> tuple[str, str]:
    """(path, reason) for one attention module: GENERATED when fiddlerc writes its code, else HF."""
    name = type(module).__name__
    if name not in PLAIN_GQA:
        return HF, f"{name} is not a kind fiddlerc generates (grouped-query attention with rotary embeddings)"
    if not all(isinstance(getattr(module, p, None), nn.Linear) for p in PROJECTIONS):
        return HF, f"{name} has no plain q/k/v/o projections"
    if hasattr(module, "sinks"):
        return HF, f"{name} has attention sinks"
    if (hasattr(module, "q_norm") or hasattr(module, "k_norm")) and head_norm_eps(module) is None:
        return HF, f"{name} normalises its queries/keys otherwise than with an RMSNorm over each head"
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


def head_norm_eps(module: nn.Module) -> float | None:
    """The epsilon of the RMSNorm a module applies to each head of its queries and keys before the rotary
    (Qwen3: `q_norm`, `k_norm`), where both are RMSNorms of the Llama kind over the head dimension (checked on
    seeded random inputs, fp32 and bf16, to the bit against that kind's arithmetic, which the generated
    code's `self.rms_norm` computes: fiddlerc.runtime.norms); else None."""
    norms = [getattr(module, n, None) for n in ("q_norm", "k_norm")]
    d = int(module.head_dim)
    eps = {getattr(n, "variance_epsilon", None) for n in norms}
    if any(n is None or tuple(getattr(n, "weight", torch.empty(0)).shape) != (d,) for n in norms) or len(eps) != 1:
        return None
    eps_value = next(iter(eps))
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        probe = type(norms[0])(d, eps=eps_value).to(dtype)
        probe.weight.data = (torch.randn(d, generator=gen) * 0.1 + 1).to(dtype)
        x = (torch.randn(2, 3, 4, d, generator=gen) * 3).to(dtype)
        h = x.to(torch.float32)
        llama_kind = probe.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps_value)).to(dtype)
        with torch.no_grad():
            if not torch.equal(probe(x), llama_kind):
                return None
    return float(eps_value)


def shape_of(module: nn.Module) -> dict[str, int | float | None]:
    """The numbers the generated code is written with."""
    head_dim = int(module.head_dim)
    q_out, k_out, v_out = (getattr(module, p).out_features for p in PROJECTIONS[:3])
    return {
        "heads": q_out // head_dim,
        "kv_heads": k_out // head_dim,
        "head_dim": head_dim,
        "q": q_out,
        "k": k_out,
        "v": v_out,
        "scaling": float(module.scaling),
        "head_norm_eps": head_norm_eps(module) if hasattr(module, "q_norm") else None,
    }


def attention_method(gm: torch.fx.GraphModule, plan: Plan) -> tuple[list[str], object]:
    """The lines of module.py's `attention` method, written with the numbers of the plan's generated
    layers (which must agree), and the family's rotary function where the method calls it (None where
    it rotates in its own code: `rotary_is_standard`). No lines where no layer is generated."""
    modules = [gm.get_submodule(f"m.{a.module}") for a in plan.attention if a.path == GENERATED]
    if not modules:
        return [], None
    shapes = {tuple(sorted(shape_of(m).items())) for m in modules}
    rotary = {rotary_function(m) for m in modules}
    if len(shapes) != 1 or len(rotary) != 1:
        raise PlanError("the generated attention layers differ in shape or rotary function: recompile")
    sh = dict(next(iter(shapes)))
    h, kvh, d, q, k, v = sh["heads"], sh["kv_heads"], sh["head_dim"], sh["q"], sh["k"], sh["v"]
    gqa = "" if h == kvh else ", enable_gqa=True"
    rotary_fn = next(iter(rotary))
    eps = sh["head_norm_eps"]
    # queries and keys normalised per head (`w.head_norm` holds each head's weight, fiddlerc.runtime.attention)
    norm = [] if eps is None else [f"        qk = self.rms_norm(qk, w.head_norm, {eps!r})"]
    if rotary_is_standard(rotary_fn, source_model(gm), d):
        family = rotary_fn.__module__.rsplit(".", 1)[-1]
        rotate = [
            f"        # rotary over queries and keys at once, with {family}.apply_rotary_pos_emb's",
            "        # arithmetic (checked equal to the bit when this was generated), in fewer calls",
            f"        qk = qkv[..., :{q + k}].view(b, t, {h + kvh}, {d})",
            *norm,
            f"        qk = qk * cos[:, :, None] + torch.cat((-qk[..., {d // 2}:], qk[..., :{d // 2}]), dim=-1) * sin[:, :, None]",
            f"        q = qk[:, :, :{h}].transpose(1, 2)",
            f"        k = qk[:, :, {h}:].transpose(1, 2)",
        ]
        rotary_fn = None
        # one token of each sequence (one sequence unpadded, or a step of the server's slots): one C call where
        # the loader set it (runtime.attention.attend_one)
        one = [
            "        if t == 1 and self.attend_one is not None and one_token_each(cache, attention_mask):",
            f"            out = self.attend_one(cache, layer, qkv, cos, sin, {h}, {kvh}, {d}, {sh['scaling']!r}, "
            f"w.head_norm, {eps if eps is not None else 0.0!r})",
            "            if out is not None:",
            "                return linear(out, w.o, w.o_bias), None",
        ]
    else:
        one = []
        rotate = [
            f"        qk = qkv[..., :{q + k}].view(b, t, {h + kvh}, {d})",
            *norm,
            f"        q = qk[:, :, :{h}].transpose(1, 2)",
            f"        k = qk[:, :, {h}:].transpose(1, 2)",
            "        q, k = apply_rotary_pos_emb(q, k, cos, sin)",
        ]
    return [
        "    def attention(self, layer, hidden_states, position_embeddings, attention_mask, cache):",
        f'        """Generated attention: {h} query heads over {kvh} KV heads of {d},{" each normalised," if eps is not None else ""} rotary embeddings, one fused',
        "        QKV projection, keys and values written in place into the static cache, SDPA over its filled",
        '        prefix. Weights: self.dense[layer] (fiddlerc.runtime.attention.AttentionWeights)."""',
        "        w = self.dense[layer]",
        "        b, t = hidden_states.shape[:2]",
        "        qkv = linear(hidden_states, w.qkv, w.qkv_bias)",
        "        cos, sin = position_embeddings",
        *one,
        *rotate,
        f"        v = qkv[..., {q + k}:{q + k + v}].view(b, t, {kvh}, {d}).transpose(1, 2)",
        "        k, v = kv_append(cache, layer, k, v)",
        "        if attention_mask is None:",
        "            mask, causal = None, causal_without_mask(t, k.shape[2])",
        "        else:",
        "            mask, causal = attention_mask[..., : k.shape[2]], False",
        "        out = torch.nn.functional.scaled_dot_product_attention(",
        f"            q, k, v, attn_mask=mask, is_causal=causal, scale={sh['scaling']!r}{gqa}",
        "        )",
        f"        return linear(out.transpose(1, 2).reshape(b, t, {q}), w.o, w.o_bias), None",
    ], rotary_fn
