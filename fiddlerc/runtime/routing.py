"""The MoE block at one token on a CPU load: the router and the experts in two C calls.

Hugging Face's sparse-MoE block at one token is a few dozen small ops (the router's product, softmax,
top-k, the renormalisation, views) around the experts, and at decode each costs about its dispatch.
Where the block is of a kind whose forward is exactly "router, then experts" (`PLAIN_BLOCKS`) and its
router computes `softmax(x W^T)` in fp32, then the top k, renormalised or not (`router_form`, checked
on a probe to the bit), and the experts run as one grouped C call (fiddlerc.runtime.kernels.GroupedExperts,
holding every expert), the loader puts a `OneTokenMoe` in the block's place: one token of one sequence
takes `_matvec.c`'s fc_route_softmax_topk and the grouped call, a few tokens (a batched decode step) the
same router and the grouped call over all of them, and every other call the block itself.
The router's logits are computed in fp32 and rounded to the weight's dtype, as `F.linear` returns them,
so the picks are Hugging Face's up to the order of a sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fiddlerc.runtime import quant

# Block classes whose forward is: hidden [B, T, H] viewed as [B*T, H], `self.gate` -> (logits, weights,
# indices), `self.experts(hidden, indices, weights)`, reshaped back; nothing else (no shared expert, no
# jitter outside training).
PLAIN_BLOCKS = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock")
_KINDS = {torch.float32: 0, torch.bfloat16: 1}  # _matvec.c's W_ codes


def router_form(gate: nn.Module, config, top_k: int) -> bool | None:
    """Whether this router renormalises its top k (True, False), where it is a softmax-then-top-k router
    (a probe of its class, built from the model's config with seeded weights, equals the reference to the
    bit on seeded inputs); None for any other router."""
    try:
        probe = type(gate)(config)
    except Exception:  # noqa: BLE001 - a router built otherwise is not one this path knows
        return None
    weight = getattr(probe, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != getattr(gate, "weight", weight).shape:
        return None
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(weight.shape, generator=gen))
        x = torch.randn(5, weight.shape[1], generator=gen)
        try:
            _, got_w, got_i = probe(x)
        except Exception:  # noqa: BLE001
            return None
        probs = F.softmax(F.linear(x, probe.weight).float(), dim=-1)
        top_w, top_i = torch.topk(probs, top_k, dim=-1)
    for normalise in (True, False):
        want = top_w / top_w.sum(dim=-1, keepdim=True) if normalise else top_w
        if torch.equal(got_i, top_i) and torch.equal(got_w.float(), want):
            return normalise
    return None


def route(x: torch.Tensor, weight: torch.Tensor, top_k: int, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(picks int64 [T, top_k], weights fp32 [T, top_k]) of tokens x [T, H] through the router `weight` [E, H],
    in one C call."""
    lib = quant.library()
    xf = quant.as_f32(x)
    tokens = xf.shape[0]
    picks = torch.empty(tokens, top_k, dtype=torch.int64)
    weights = torch.empty(tokens, top_k, dtype=torch.float32)
    experts, hidden = weight.shape
    code = lib.lib.fc_route_softmax_topk(_KINDS[weight.dtype], weight.data_ptr(), experts, hidden, xf.data_ptr(), tokens,
                                         top_k, int(normalise), picks.data_ptr(), weights.data_ptr(), int(lib.simd))  # fmt: skip
    if code == -1:
        raise ValueError(f"top-{top_k} of {experts} experts: k must be between 1 and the number of experts")
    if code != 0:
        raise MemoryError("fiddlerc's router kernel could not allocate its buffer")
    return picks, weights


class OneTokenMoe(nn.Module):
    """In place of a Hugging Face sparse-MoE block (`block`, kept as a child and called for everything else):
    one token of one sequence on the CPU is routed in C and its experts run as one grouped call of its
    placed experts (`placed`, fiddlerc.runtime.experts.PlacedExperts), which counts the picks."""

    def __init__(self, block: nn.Module, top_k: int, normalise: bool, placed) -> None:
        super().__init__()
        self.block = block
        self.top_k, self.normalise = top_k, normalise
        self.router = block.gate.weight
        self._placed = [placed]  # not a child: the block holds it already

    @staticmethod
    def accepts(router) -> bool:
        """Whether the C router reads this weight: a contiguous fp32/bf16 CPU matrix, the kernels built."""
        ok = isinstance(router, torch.Tensor) and router.device.type == "cpu" and router.dtype in _KINDS
        return ok and router.dim() == 2 and router.is_contiguous() and quant.library() is not None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        placed = self._placed[0]
        tokens = hidden_states.numel() // hidden_states.shape[-1]
        if not args and not kwargs and placed.one_call_ready():
            x = hidden_states.reshape(tokens, -1)
            if tokens == 1:
                picks, weights = route(x, self.router, self.top_k, self.normalise)
                out = placed.grouped(x, picks[0], weights[0], placed.decode_counts)
                return out.view_as(hidden_states).to(hidden_states.dtype)
            if placed.tokens_at_once(tokens):  # a batched decode step: the experts read once for all its tokens
                picks, weights = route(x, self.router, self.top_k, self.normalise)
                out = placed.grouped.tokens(x, picks, weights, placed.decode_counts)
                return out.view_as(hidden_states).to(hidden_states.dtype)
        return self.block(hidden_states, *args, **kwargs)

    def __getattr__(self, name: str):
        """The block's own attributes (`experts`, `gate`, ...) read through, as code written for it expects."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "block" not in self._modules:
                raise
            return getattr(self._modules["block"], name)

    def extra_repr(self) -> str:
        how = "renormalised" if self.normalise else "as they are"
        return (
            f"one token or a batched step: router in C (softmax, top-{self.top_k} {how}) and one grouped experts call"
        )
