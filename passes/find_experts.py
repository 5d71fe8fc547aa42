"""find_experts: the MoE blocks, their routed experts, router and shared experts.

Reads: the expanded graph (dispatch/expert/combine nodes from capture) and its modules.
Writes: `plan.moe_layers`; `node.meta["fiddlerc"]["bytes"]` on every expert node.
"""

from __future__ import annotations

import torch
import torch.fx

from fiddlerc.capture import META_KEY, experts_layout_problem, moe_sites, source_model
from fiddlerc.errors import UnsupportedModelError
from fiddlerc.options import CompileOptions, parse_dtype
from fiddlerc.plan import MoeLayer, Plan


def _top_k(block: torch.nn.Module, config) -> int:
    for owner in (getattr(block, "gate", None), block):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    k = getattr(config, "num_experts_per_tok", None)
    if isinstance(k, int) and k > 0:
        return k
    raise UnsupportedModelError(f"cannot find the top-k of MoE block {type(block).__name__}")


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
        experts = model.get_submodule(site.experts_path)
        problem = experts_layout_problem(experts)
        if problem is not None:
            raise UnsupportedModelError(
                f"{plan.model.architecture}: experts module {type(experts).__name__} uses {problem}, "
                "which fiddlerc's placed experts do not support yet"
            )
        n = int(experts.num_experts)
        expert_params = list(experts.parameters())
        router = getattr(block, "gate", None)
        router_params = set(router.parameters()) if isinstance(router, torch.nn.Module) else set()
        shared = [p for p in block.parameters() if p not in router_params and all(p is not q for q in expert_params)]
        per_expert = param_bytes(expert_params, dtype) // n
        layers.append(
            MoeLayer(
                layer=site.layer,
                block=site.block_path,
                experts_module=site.experts_path,
                num_experts=n,
                top_k=_top_k(block, config),
                bytes_per_expert=per_expert,
                shared_expert_bytes=param_bytes(shared, dtype),
            )
        )
        for node in site.experts:
            node.meta[META_KEY]["bytes"] = per_expert
    if not layers:
        raise UnsupportedModelError(
            f"{plan.model.architecture} has no mixture-of-experts blocks: fiddlerc compiles MoE models "
            "(Mixtral, Qwen2-MoE, DeepSeek-V3, ...); run dense models with transformers directly"
        )
    return plan.with_(moe_layers=tuple(sorted(layers, key=lambda ml: ml.layer)))
