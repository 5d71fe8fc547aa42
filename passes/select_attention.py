"""select_attention: which decoder layers run fiddlerc's generated attention, and which Hugging Face's.

Reads: the captured graph's attention calls (token-mixer leaves) and their modules.
Writes: `plan.attention`, one entry per attention call with its path and the reason.
"""

from __future__ import annotations

import re

import torch.fx

from fiddlerc.compiler.attention import attention_path
from fiddlerc.compiler.capture import is_token_mixer, source_model
from fiddlerc.compiler.options import CompileOptions
from fiddlerc.plan import GENERATED, HF, AttentionLayer, Plan

_LAYER = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")


def attention_nodes(gm: torch.fx.GraphModule) -> list[tuple[int, torch.fx.Node]]:
    """(decoder layer, node) of every attention call, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = _LAYER.search(f".{node.target}.")
        if m is None or not is_token_mixer(gm.get_submodule(node.target)):
            continue
        out.append((int(m.group(1)), node))
    return out


def _call_has_standard_arguments(node: torch.fx.Node) -> bool:
    """The generated code takes hidden states, rotary tables, mask and cache, by these names."""
    return (
        not node.args
        and {"hidden_states", "position_embeddings", "attention_mask"} <= set(node.kwargs)
        and any(k in node.kwargs for k in ("cache", "past_key_values"))
    )


def select_attention(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    model = source_model(gm)
    layers = []
    for layer, node in attention_nodes(gm):
        module = gm.get_submodule(node.target)
        path, reason = attention_path(module, model.config)
        if path == GENERATED and not _call_has_standard_arguments(node):
            path, reason = HF, "its decoder layer calls it with other arguments than the generated code takes"
        layers.append(AttentionLayer(layer=layer, module=node.target.removeprefix("m."), path=path, reason=reason))
    return plan.with_(attention=tuple(layers))
