"""MoE block layouts: how a family's MoE block holds its routed experts and calls them.

One generic layout serves every experts module that follows transformers' experts interface
(`use_experts_implementation`: fused 3-D weights, flags, `_apply_gate`, called as
`experts(x, top_k_index, top_k_weights)`), whatever the model. Small named adapters cover the
families that do not: DBRX (2-D expert weights), JetMoE (experts split in two modules, no
experts call) and Llama4 (router scores multiply the input, experts run densely).

Each layout answers, for one block: which parameters are routed experts, how one expert computes
(`ExpertMath`), where expert e's weights are in the checkpoint, and how to make the block call a
`PlacedExperts` module instead of its own experts.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

# get(name, e) -> the parts of parameter `name` (relative to the block) for expert e, as stored
# (one slice of a fused [E, ...] tensor, or one tensor per stored part); whole(name) -> the full tensor.
PartsFn = Callable[[str, int], tuple[torch.Tensor, ...]]
WholeFn = Callable[[str], torch.Tensor]


class ExpertParts(NamedTuple):
    """One expert's weights as the runtime computes with them, in `F.linear` layout ([out, in]; views of
    the checkpoint's tensors, transposed where stored the other way): `w_in` is the input projection,
    one tensor ([2I, H] gate and up, or [I, H] up only) or, where the gate applies to its halves, the
    two halves (gate [I, H], up [I, H]); `w_out` is [H, I]. The loader turns them into the runtime's
    ExpertWeights (fiddlerc.runtime.experts)."""

    w_in: tuple[torch.Tensor, ...]
    b_in: tuple[torch.Tensor, ...] | None
    w_out: torch.Tensor
    b_out: torch.Tensor | None


@dataclass(frozen=True)
class ExpertMath:
    """How an expert computes, read off a transformers experts module (its flags and gate function)."""

    act: Callable[[torch.Tensor], torch.Tensor]
    gate: Callable[[torch.Tensor], torch.Tensor] | None  # the family's `_apply_gate`; None: act(up) only
    split_gate: bool  # the default gate act(gate) * up, computed on the halves without concatenating
    scale_input: bool = False  # routing weight multiplies the expert's input (Llama4), not its output

    @staticmethod
    def of(module: nn.Module) -> ExpertMath:
        """Keeps the family's exact gate arithmetic (GPT-OSS's clamped SwiGLU, ...) by calling its own code."""
        from transformers.integrations.moe import _default_apply_gate

        has_gate = getattr(module, "has_gate", True)
        apply_gate = getattr(type(module), "_apply_gate", _default_apply_gate)
        split = has_gate and getattr(module, "is_concatenated", True) and apply_gate is _default_apply_gate
        gate = functools.partial(apply_gate, module) if has_gate else None
        return ExpertMath(act=getattr(module, "act_fn", None), gate=gate, split_gate=split)


def _params(module: nn.Module) -> dict[str, nn.Parameter]:
    return module._parameters  # not getattr: while tracing, fx turns parameter reads into proxies


@dataclass(frozen=True)
class Layout:
    name: str  # shown in the plan and the report
    experts: str  # path, relative to the block, of the module holding the routed experts ("" = the block)

    def expert_params(self, block: nn.Module) -> dict[str, nn.Parameter]:
        """Routed-expert parameters by name relative to the block."""
        holder = block.get_submodule(self.experts) if self.experts else block
        prefix = f"{self.experts}." if self.experts else ""
        return {prefix + n: p for n, p in holder.named_parameters()}

    def num_experts(self, block: nn.Module) -> int:
        raise NotImplementedError

    def problem(self, block: nn.Module) -> str | None:
        """Why fiddlerc cannot run this block yet, or None."""
        return None

    def math(self, block: nn.Module) -> ExpertMath:
        raise NotImplementedError

    def weights(self, block: nn.Module, e: int, parts: PartsFn, whole: WholeFn) -> ExpertParts:
        raise NotImplementedError

    def install(self, block: nn.Module, placed: nn.Module) -> None:
        """Make the block call `placed` (the runtime's PlacedExperts) for its routed experts."""
        setattr(block, self.experts, placed)


def _is_interface_experts(module: nn.Module, hidden: int | None) -> bool:
    params = _params(module)
    down, up = params.get("down_proj"), params.get("gate_up_proj", params.get("up_proj"))
    if not (isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter) and down.ndim == up.ndim == 3):
        return False
    if not hasattr(module, "num_experts"):
        return False
    if hasattr(module, "has_gate"):  # decorated with use_experts_implementation: its flags say the layout
        return True
    # Undecorated (a new family, say): accept only the unambiguous default layout [E, 2I, H], [E, H, I].
    return hidden is not None and up.shape[2] == hidden == down.shape[1] and up.shape[1] == 2 * down.shape[2] != hidden


class ExpertsInterface(Layout):
    """transformers' experts interface: flags (`has_gate`, `has_bias`, `is_transposed`,
    `is_concatenated`) and the family's `_apply_gate` say how an expert computes."""

    def num_experts(self, block):
        return int(block.get_submodule(self.experts).num_experts)

    def problem(self, block):
        experts = block.get_submodule(self.experts)
        if getattr(experts, "has_post_expert_norm", False):
            return "a post-expert norm (has_post_expert_norm=True)"
        return None

    def math(self, block):
        return ExpertMath.of(block.get_submodule(self.experts))

    def weights(self, block, e, parts, whole):
        experts = block.get_submodule(self.experts)
        transposed = getattr(experts, "is_transposed", False)
        p = f"{self.experts}."

        def get(name: str) -> tuple[torch.Tensor, ...] | None:
            if name not in _params(experts):
                return None
            got = parts(p + name, e)
            return tuple(t.t() for t in got) if transposed and got[0].ndim == 2 else got

        in_name = "gate_up_proj" if "gate_up_proj" in _params(experts) else "up_proj"
        w_in, b_in = get(in_name), get(f"{in_name}_bias")
        if ExpertMath.of(experts).split_gate and len(w_in) == 1:  # [2I, H] -> gate [I, H], up [I, H] (views)
            w_in = tuple(w_in[0].chunk(2, dim=0))
            b_in = tuple(b_in[0].chunk(2, dim=0)) if b_in else None
        (w_out,) = get("down_proj")
        b_out = get("down_proj_bias")
        return ExpertParts(w_in, b_in, w_out, b_out[0] if b_out else None)


class Dbrx(Layout):
    """DBRX: experts.mlp.{w1, v1, w2} stored 2-D as [E * I, H]; act(x w1_e^T) * (x v1_e^T) w2_e."""

    def num_experts(self, block):
        return int(block.experts.num_experts)

    def math(self, block):
        return ExpertMath(act=block.experts.mlp.activation_fn, gate=None, split_gate=True)

    def weights(self, block, e, parts, whole):
        n, inter = block.experts.num_experts, block.experts.ffn_hidden_size

        def expert(name: str) -> torch.Tensor:
            return whole(f"experts.mlp.{name}").view(n, inter, -1)[e]  # [I, H], a view

        return ExpertParts((expert("w1"), expert("v1")), None, expert("w2").t(), None)

    def install(self, block, placed):
        block.experts = _DbrxExperts(placed)


class _DbrxExperts(nn.Module):
    """DBRX's experts call: [B, T, H] in, [B, -1, H] out."""

    def __init__(self, placed: nn.Module) -> None:
        super().__init__()
        self.placed = placed

    def forward(self, hidden_states, top_k_index, top_k_weights):
        batch = hidden_states.shape[0]
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.placed(flat, top_k_index, top_k_weights).view(batch, -1, flat.shape[-1])


class JetMoe(Layout):
    """JetMoE's MLP: input_linear [E, 2I, H] and output_linear [E, H, I], softmax over the top-k logits."""

    def expert_params(self, block):
        return {"input_linear.weight": block.input_linear.weight, "output_linear.weight": block.output_linear.weight}

    def num_experts(self, block):
        return int(block.input_linear.num_experts)

    def math(self, block):
        return ExpertMath(act=block.activation, gate=None, split_gate=True)

    def weights(self, block, e, parts, whole):
        (w_in,) = parts("input_linear.weight", e)
        (w_out,) = parts("output_linear.weight", e)
        return ExpertParts(tuple(w_in.chunk(2, dim=0)), None, w_out, None)

    def install(self, block, placed):
        del block.input_linear, block.output_linear  # their (meta) weights now live in `placed`
        block.placed_experts = placed
        block.forward = types.MethodType(_jetmoe_forward, block)


def _jetmoe_forward(self, layer_input):
    """JetMoeMoE.forward with the experts call replaced; same arithmetic and summation order."""
    bsz, length, emb = layer_input.size()
    x = layer_input.reshape(-1, emb)
    logits = self.router.layer(x).float()
    top_k_logits, top_k_index = logits.topk(self.router.top_k, dim=1)
    top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(x)
    out = self.placed_experts(x, top_k_index, top_k_gates)
    return out.view(bsz, length, emb) + self.bias


class Llama4(Layout):
    """Llama4 text MoE: sigmoid router scores multiply the expert's input; weights [E, H, 2I], [E, I, H]."""

    def num_experts(self, block):
        return int(block.experts.num_experts)

    def math(self, block):
        return ExpertMath(act=block.experts.act_fn, gate=None, split_gate=True, scale_input=True)

    def weights(self, block, e, parts, whole):
        (gate_up,) = parts("experts.gate_up_proj", e)  # [H, 2I]
        (down,) = parts("experts.down_proj", e)  # [I, H]
        return ExpertParts(tuple(gate_up.t().chunk(2, dim=0)), None, down.t(), None)

    def install(self, block, placed):
        block.experts = placed
        block.forward = types.MethodType(_llama4_forward, block)


def _llama4_forward(self, hidden_states):
    """Llama4TextMoe.forward with sparse dispatch; unselected experts contributed exact zeros there."""
    x = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(x)  # scores [T, E]: sigmoid of the top-k logits, 0 elsewhere
    top_k_index = torch.topk(router_logits, self.router.top_k, dim=1).indices
    routed = self.experts(x, top_k_index, router_scores.gather(1, top_k_index))
    out = self.shared_expert(x)
    out.add_(routed)
    return out, router_logits


def find_layout(block: nn.Module, hidden_size: int | None = None) -> Layout | None:
    """The layout of `block` if it is an MoE block, else None."""
    cls = type(block).__name__
    children = dict(block.named_children())
    experts = children.get("experts")
    if cls == "JetMoeMoE":
        return JetMoe("jetmoe", "")
    if experts is not None and type(experts).__name__ == "DbrxExperts":
        return Dbrx("dbrx", "experts")
    if experts is not None and type(experts).__name__ == "Llama4TextExperts" and "router" in children:
        return Llama4("llama4", "experts")
    for name, child in children.items():
        if _is_interface_experts(child, hidden_size):
            return ExpertsInterface("experts-interface", name)
    return None


# model_type -> name: the families checked end to end against Hugging Face (tests/model/test_families.py).
# Others whose blocks follow the experts interface compile too; these are the ones we vouch for.
VERIFIED = {
    "mixtral": "Mixtral",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3_moe": "Qwen3-MoE",
    "qwen3_next": "Qwen3-Next",
    "olmoe": "OLMoE",
    "flex_olmo": "FlexOlmo",
    "deepseek_v2": "DeepSeek-V2",
    "deepseek_v3": "DeepSeek-V3",
    "glm4_moe": "GLM-4-MoE",
    "dots1": "dots.llm1",
    "gpt_oss": "GPT-OSS",
    "phimoe": "PhiMoE",
    "granitemoe": "Granite-MoE",
    "granitemoeshared": "Granite-MoE-Shared",
    "ernie4_5_moe": "ERNIE-4.5-MoE",
    "minimax": "MiniMax",
    "minimax_m2": "MiniMax-M2",
    "hunyuan_v1_moe": "HunYuan-MoE-V1",
    "jetmoe": "JetMoE",
    "dbrx": "DBRX",
    "llama4_text": "Llama 4 (text)",
}


def supported_text() -> str:
    """One line per verified family, for the README, the CLI and error messages."""
    return "\n".join(f"- {name} (`{mtype}`)" for mtype, name in VERIFIED.items())
