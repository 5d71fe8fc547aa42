"""find_experts: the MoE blocks, their routed experts, router kind and shared experts.

Reads: the expanded graph (dispatch/expert/combine nodes from capture) and its modules.
Writes: `plan.moe_layers`.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx

from fiddlerc.compiler.capture import moe_sites, source_model
from fiddlerc.compiler.options import CompileOptions
from fiddlerc.errors import UnsupportedModelError
from fiddlerc.model.families import find_layout
from fiddlerc.model.folder import supported_names
from fiddlerc.plan import MoeLayer, Plan
from fiddlerc.units import parse_dtype


def _top_k(block: torch.nn.Module, config) -> int:
    for owner in (getattr(block, "gate", None), getattr(block, "router", None), block):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    for name in ("num_experts_per_tok", "moe_k", "moe_topk"):
        k = getattr(config, name, None)
        k = k[0] if isinstance(k, list) and k else k
        if isinstance(k, int) and k > 0:
            return k
    raise UnsupportedModelError(f"cannot find the top-k of MoE block {type(block).__name__}")


def _scoring(router: torch.nn.Module | None, block: torch.nn.Module) -> str:
    """'sigmoid' or 'softmax', read from the router's (or the block's) forward source."""
    for owner in (router, block):
        if owner is None:
            continue
        try:
            src = inspect.getsource(type(owner).forward)
        except (OSError, TypeError):
            continue
        if "sigmoid" in src:
            return "sigmoid"
        if "softmax" in src:
            return "softmax"
    return "softmax"


def routing_kind(block: torch.nn.Module, layout: str, config) -> str:
    """How the router turns logits into expert choices, in words (for the plan and the report)."""
    router = getattr(block, "gate", None) or getattr(block, "router", None)
    router = router if isinstance(router, torch.nn.Module) else None
    if layout == "llama4":
        return "sigmoid top-k; scores scale the expert input"
    if config.model_type == "phimoe":
        return "sparsemixer top-2"
    if layout == "jetmoe":
        return "top-k logits, softmax over the chosen"
    scoring = _scoring(router, block)
    names = [n for n, _ in (*router.named_parameters(), *router.named_buffers())] if router is not None else []
    if any(n.endswith("e_score_correction_bias") for n in names):
        groups = getattr(config, "n_group", 1) or 1
        limit = f", group-limited ({getattr(config, 'topk_group', 1)} of {groups} groups)" if groups > 1 else ""
        return f"{scoring} + bias{limit}"
    if getattr(config, "topk_method", None) == "group_limited_greedy":
        return f"{scoring}, group-limited ({config.topk_group} of {config.n_group} groups)"
    renorm = getattr(config, "norm_topk_prob", None)
    return f"{scoring} top-k" + (", renormalized" if renorm else "")


def param_bytes(params, dtype: torch.dtype) -> int:
    """Bytes of `params` once converted to the compute dtype."""
    return sum(p.numel() * dtype.itemsize for p in params)


def find_experts(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    dtype = parse_dtype(plan.model.dtype)
    model = source_model(gm)
    config = model.config
    layers = []
    for site in moe_sites(gm.graph):
        block = model.get_submodule(site.block_path)
        layout = find_layout(block, getattr(config, "hidden_size", None))
        problem = layout.problem(block)
        if problem is not None:
            raise UnsupportedModelError(
                f"{plan.model.architecture}: MoE block {type(block).__name__} uses {problem}, "
                "which fiddlerc's placed experts do not support yet"
            )
        n = layout.num_experts(block)
        expert_params = list(layout.expert_params(block).values())
        total = param_bytes(expert_params, dtype)
        if total % n:
            raise UnsupportedModelError(f"{site.block_path}: expert weights do not split evenly over {n} experts")
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        not_shared = {id(p) for p in expert_params}
        if isinstance(router, torch.nn.Module):
            not_shared |= {id(p) for p in router.parameters()}
        shared = [p for p in block.parameters() if id(p) not in not_shared]
        layers.append(
            MoeLayer(
                layer=site.layer,
                block=site.block_path,
                experts_module=site.experts_path,
                layout=layout.name,
                routing=routing_kind(block, layout.name, config),
                num_experts=n,
                top_k=_top_k(block, config),
                bytes_per_expert=total // n,
                shared_expert_bytes=param_bytes(shared, dtype),
            )
        )
    if not layers:
        raise UnsupportedModelError(
            f"{plan.model.architecture} has no mixture-of-experts block fiddlerc recognises: it compiles MoE models "
            f"({supported_names()}, or any whose experts follow transformers' experts interface); "
            "run dense models with transformers directly"
        )
    return plan.with_(moe_layers=tuple(sorted(layers, key=lambda ml: ml.layer)))
